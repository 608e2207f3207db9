"""What readers of shared state accept: replica URLs, wall-clock times, and a log that says each problem once.

Anyone who can write to the shared volume (or answer as a replica) writes what these readers see. A value
they refuse is ignored with a logged reason; it never raises past the reader, and never reaches a request
that carries the API token.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
from urllib.parse import urlsplit

from lockstep.core.clock import SYSTEM_CLOCK, Clock
from lockstep.store.manifest import MAX_WALL_TIME

MAX_URL_CHARS = 2048
DEFAULT_CLOCK_SKEW_S = 2.0  # Settings.clock_skew_s's default, for readers called without settings
# Characters of a replica base URL: RFC 3986 unreserved, ':' '/' '[' ']' and percent-escapes. No '@'
# (userinfo would carry credentials), no '?' or '#' (a base URL has neither), no spaces or controls.
_URL_CHARS = re.compile(r"^[A-Za-z0-9\-._~:/\[\]%]+$")
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def url_problem(url: object) -> str | None:
    """Why ``url`` is not a usable replica base URL (http/https, a host, no userinfo, no odd characters), or None."""
    if not isinstance(url, str):
        return f"URL {url!r} is not a string"
    if not url or len(url) > MAX_URL_CHARS:
        return f"URL of {len(url)} characters is empty or over {MAX_URL_CHARS}"
    if not _URL_CHARS.match(url):
        return f"URL {url[:120]!r} holds characters a replica URL never has (userinfo, query, spaces, controls)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"URL {url[:120]!r} is malformed: {exc}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"URL {url[:120]!r} is not http or https"
    host = parts.hostname or ""
    if not host:
        return f"URL {url[:120]!r} names no host"
    if port is not None and not 1 <= port <= 65535:
        return f"URL {url[:120]!r} has port {port}, outside 1-65535"
    if not host_is_valid(host):
        return f"URL {url[:120]!r} has host {host[:80]!r}, which is neither an IP address nor a DNS name"
    return None


def host_is_valid(host: str) -> bool:
    """An IP address (v4, or v6 without a zone) or a DNS name of letters, digits and hyphens."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host.lower().rstrip(".")
    return 0 < len(name) <= 253 and all(_DNS_LABEL.match(label) for label in name.split("."))


def url_host(url: str) -> str:
    """The host of a valid URL, lower-case, IPv6 compressed (so equal addresses compare equal)."""
    host = (urlsplit(url).hostname or "").lower().rstrip(".")
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


def wall_time_problem(value: object, what: str) -> str | None:
    """Why ``value`` is not a wall-clock time (finite seconds between 1970 and 2100), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{what} {value!r} is not a number"
    if not math.isfinite(value) or not 0 <= value <= MAX_WALL_TIME:
        return f"{what} {value!r} is not a wall-clock time (finite seconds since 1970, before 2100)"
    return None


class ProblemLog:
    """Logs each (key, message) at most once per ``interval_s``: readers poll ten times a second."""

    MAX_KEYS = 1024  # forget everything past this: a writer inventing new names must not grow memory

    def __init__(self, logger: logging.Logger, *, interval_s: float = 60.0, clock: Clock = SYSTEM_CLOCK,
                 level: int = logging.WARNING) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self.level = level
        self._last: dict[tuple[str, str], float] = {}

    def report(self, key: str, message: str) -> bool:
        """Log ``message`` unless the same one was logged for ``key`` within the interval; True if logged."""
        now = self.clock.monotonic()
        seen = self._last.get((key, message))
        if seen is not None and now - seen < self.interval_s:
            return False
        if len(self._last) >= self.MAX_KEYS:
            self._last.clear()
        self._last[(key, message)] = now
        self.logger.log(self.level, "%s", message)
        return True

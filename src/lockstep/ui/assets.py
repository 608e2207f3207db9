"""The page's own files (package data), read once and served by name: a request never becomes a file path."""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass

NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.[a-z0-9]+$")
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass(frozen=True)
class Asset:
    """One file of the page, in memory."""

    body: bytes
    media_type: str
    etag: str


class Assets:
    """Every file directly in ``lockstep/ui/static``, keyed by its name."""

    def __init__(self, package: str = "lockstep.ui", folder: str = "static") -> None:
        self._files: dict[str, Asset] = {}
        root = importlib.resources.files(package) / folder
        for entry in root.iterdir():
            suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
            if entry.is_file() and NAME.fullmatch(entry.name) and suffix in TYPES:
                body = entry.read_bytes()
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                self._files[entry.name] = Asset(body, TYPES[suffix], etag)

    def get(self, name: str) -> Asset | None:
        """The asset called ``name``, or None: unknown names (and anything with a '/') never match."""
        return self._files.get(name)

    def names(self) -> list[str]:
        return sorted(self._files)

"""What a coordinator reads from a replica over HTTP is bounded in time and in size, whatever the sender does:
an answer dripping a byte at a time, or one of many megabytes, counts as no answer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from lockstep.core.clock import SYSTEM_CLOCK
from lockstep.sync.http_fleet import MAX_ANSWER_BYTES, UnboundedAnswer, bounded_request
from tests.support.cluster import serving

ANSWER = b'{"status": "ok"}' + b" " * 24  # 40 bytes of valid JSON


@contextmanager
def stub() -> Iterator[str]:
    """A replica-like server: /drip sends ANSWER a byte every 0.25 s (10 s), /huge 8 MiB of JSON padding."""
    app = FastAPI()

    def drip() -> Iterator[bytes]:
        for byte in ANSWER:
            time.sleep(0.25)
            yield bytes([byte])

    def huge() -> Iterator[bytes]:
        yield b'{"status": "ok"'
        for _ in range(8 * 16):
            yield b" " * (64 << 10)
        yield b"}"

    app.get("/drip")(lambda: StreamingResponse(drip(), media_type="application/json"))
    app.get("/huge")(lambda: StreamingResponse(huge(), media_type="application/json"))
    app.get("/ok")(lambda: StreamingResponse(iter([ANSWER]), media_type="application/json"))
    with serving(app) as url:
        yield url


def test_an_answer_is_read_whole_within_its_time_and_size_or_not_at_all() -> None:
    with stub() as url, httpx.Client() as client:
        assert bounded_request(client, "GET", f"{url}/ok", 5.0, SYSTEM_CLOCK).json() == {"status": "ok"}
        # Each byte comes well within any read timeout; the whole answer does not come within 1 s.
        with pytest.raises(UnboundedAnswer, match="within 1 s"):
            bounded_request(client, "GET", f"{url}/drip", 1.0, SYSTEM_CLOCK)
        with pytest.raises(UnboundedAnswer, match=f"more than {MAX_ANSWER_BYTES} bytes"):
            bounded_request(client, "GET", f"{url}/huge", 30.0, SYSTEM_CLOCK)

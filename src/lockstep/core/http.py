"""What every Lockstep HTTP app shares: errors mapped to status codes in one place, and bearer auth."""

from __future__ import annotations

import hmac
import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lockstep.core.errors import LockstepError, Overloaded, Unauthorized

log = logging.getLogger(__name__)


def error_body(message: str, code: str, param: str | None = None) -> dict[str, object]:
    """OpenAI-shaped error body: {"error": {"message", "type", "param", "code"}}.

    A message may quote what the client sent, and JSON's "\\ud800" escape makes a lone surrogate that UTF-8 cannot
    encode: it is written as that escape, so the answer is the 400 it describes and not a 500."""
    def encodable(text: str | None) -> str | None:
        return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")

    message, param = encodable(message) or "", encodable(param)
    return {"error": {"message": message, "type": code, "param": param, "code": code}}


# Where pydantic names a member of a union in an error's location ("prompt.constrained-str",
# "prompt.list[function-after[...]].1"): the caller's field is "prompt", or "prompt.1".
_UNION_MEMBER = re.compile(r".*\[.*|[a-z]+(-[a-z]+)+|str|int|float|bool|list|dict")


def _describe(exc: RequestValidationError) -> tuple[str, str | None]:
    parts: list[str] = []
    first_param = None
    for err in exc.errors()[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _UNION_MEMBER.fullmatch(str(p))]
        where = ".".join(loc) or "body"
        first_param = first_param or where
        if err.get("type") == "json_invalid":
            parts.append("the request body is not valid JSON")
        elif err.get("type") == "missing":
            parts.append(f"{where} is required")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"{where} is not a supported field")
        else:
            parts.append(f"{where}: {err.get('msg')}")
    return "; ".join(dict.fromkeys(parts)) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    """Map LockstepError, validation and HTTP errors to JSON bodies with the right status."""

    @app.exception_handler(LockstepError)
    async def _lockstep_error(request: Request, exc: LockstepError) -> JSONResponse:
        headers = {}
        if isinstance(exc, Overloaded):
            headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        if exc.status_code >= 500:
            log.warning("%s %s → %d: %s", request.method, request.url.path, exc.status_code, exc)
        return JSONResponse(error_body(str(exc), exc.code), status_code=exc.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not decode the body
            return JSONResponse(error_body(unreadable_body(exc.__cause__), "invalid_request_error"), status_code=400)
        return JSONResponse(error_body(str(exc.detail), "http_error"), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))


def unreadable_body(cause: BaseException) -> str:
    """What is wrong with a body that is not even malformed JSON to the parser (it raised something else)."""
    if isinstance(cause, UnicodeDecodeError):
        return "the request body is not valid JSON: it is not UTF-8 text"
    if isinstance(cause, RecursionError):
        return "the request body is not valid JSON this server reads: it is nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):  # int('9' * 5000): Python's 4300-digit limit
        return "the request body is not valid JSON this server reads: it holds an integer of over 4300 digits"
    return f"the request body is not valid JSON ({type(cause).__name__})"


def bearer_headers(token: str | None) -> dict[str, str]:
    """The ``Authorization`` header ``check_bearer`` accepts; none without a token."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_bearer(request: Request, token: str | None) -> None:
    """Require ``Authorization: Bearer <token>`` when a token is configured."""
    if not token:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("this endpoint needs 'Authorization: Bearer <token>' (LOCKSTEP_API_TOKEN)")

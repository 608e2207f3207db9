"""One small hierarchy of errors; the HTTP layer maps ``status_code`` to the response."""

from __future__ import annotations


class LockstepError(Exception):
    """Base error. The message says what went wrong and what to do."""

    status_code = 500
    code = "internal_error"


class BadRequest(LockstepError):
    status_code = 400
    code = "invalid_request_error"


class BadModelRef(BadRequest):
    """A model reference that is malformed, escapes the store, or names nothing."""

    code = "invalid_model_reference"


class UnsafeModel(BadRequest):
    """A model that needs pickle or remote code while the operator has not opted in."""

    code = "unsafe_model"


class NotFound(LockstepError):
    status_code = 404
    code = "not_found"


class Conflict(LockstepError):
    status_code = 409
    code = "conflict"


class Unauthorized(LockstepError):
    status_code = 401
    code = "unauthorized"


class Overloaded(LockstepError):
    """The admission queue is full; retry after ``retry_after_s``."""

    status_code = 429
    code = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(LockstepError):
    status_code = 503
    code = "not_ready"


class VerificationError(LockstepError):
    """Files that do not match their MANIFEST, or weights that do not match a digest."""

    status_code = 422
    code = "verification_failed"


class LoadError(LockstepError):
    """A model could not be loaded."""

    status_code = 422
    code = "model_load_failed"


class LeaseHeld(Conflict):
    """Another coordinator holds the lease."""

    code = "lease_held"

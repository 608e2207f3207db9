"""The trainer's refusal of a folder reference, as the UI relays it: never whether a path exists on its host.

The trainer explains a bad folder precisely ("does not exist", "holds no weights", "has only pickle weights:
a.bin, ..."), which is right for the operator holding the token but would make the UI an oracle of the
trainer's filesystem for anyone the UI lets in (a proxy-authenticated user, or anyone when no token is set).
So when a form named a folder and the trainer refused it, every such refusal reads the same.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx
from fastapi.responses import JSONResponse

from lockstep.core.http import error_body

# How a model reference names a folder on the trainer's host (lockstep.models.refs accepts these forms).
FOLDER_PREFIXES = ("/", "./", "../", "~")
# Statuses the trainer answers for a reference it cannot use: bad or unsafe (400), missing (404), unloadable (422).
REFUSALS = frozenset({400, 404, 422})


def is_folder(value: Any) -> bool:
    """True for a string that names a folder (absolute, ./, ../, ~ or with a backslash)."""
    return isinstance(value, str) and (value.strip().startswith(FOLDER_PREFIXES) or "\\" in value)


def folders_in(values: Iterable[Any]) -> list[str]:
    """The folder references among ``values``, in order."""
    return [str(v).strip() for v in values if is_folder(v)]


def hide_folder_details(response: httpx.Response, folders: list[str]) -> JSONResponse | None:
    """One plain refusal in place of the trainer's when the request named a folder and the trainer refused it."""
    if not folders or response.status_code not in REFUSALS:
        return None
    message = (f"the trainer cannot use the folder {folders[0]!r}: it is not a model folder the trainer can read "
               "(a folder with config.json and *.safetensors weights). The UI does not say which, so that it does "
               "not tell which paths exist on the trainer's host; for the exact reason run "
               "`lockstep publish PATH --trainer URL` with LOCKSTEP_API_TOKEN set, or read the trainer's answer "
               "to POST /publish.")
    return JSONResponse(error_body(message, "invalid_model_reference"), status_code=400)

"""Model references: what a user may name as a model, parsed and checked before anything loads."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from lockstep.core.errors import BadModelRef

# huggingface_hub's rule: namespace/name, letters, digits, '-', '_', '.', no '--' or '..', ≤ 96 chars.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_VERSION = re.compile(r"^versions/(\d{1,9})/?$")
_BUILTIN = re.compile(r"^builtin:(tiny|mid)(?:-s(\d{1,6}))?$")

ALLOWED_FORMS = (
    "a Hugging Face repo id ('org/name' or 'name', optionally '@revision'), "
    "a local directory (an absolute path or one starting with './'), "
    "a published version ('versions/N'), or a built-in model ('builtin:tiny', 'builtin:tiny-s1', 'builtin:mid')"
)


class RefKind(str, Enum):
    """The kinds of model reference."""

    REPO = "repo"
    DIRECTORY = "directory"
    VERSION = "version"
    BUILTIN = "builtin"


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference; ``raw`` is what the user wrote."""

    raw: str
    kind: RefKind
    repo_id: str | None = None
    revision: str | None = None
    path: Path | None = None
    version: int | None = None
    builtin: str | None = None  # e.g. "tiny-s1"

    def __str__(self) -> str:
        return self.raw


def parse_ref(raw: str, *, allow_directories: bool = True) -> ModelRef:
    """Parse a reference, refusing malformed ones and store paths that could escape (``..``)."""
    if not isinstance(raw, str) or not raw.strip():
        raise BadModelRef(f"empty model reference; expected {ALLOWED_FORMS}")
    ref = raw.strip()
    if len(ref) > 1024 or "\x00" in ref:
        raise BadModelRef(f"model reference is malformed or too long (max 1024 characters); expected {ALLOWED_FORMS}")

    if m := _BUILTIN.match(ref):
        size, seed = m.group(1), int(m.group(2) or 0)
        return ModelRef(raw=ref, kind=RefKind.BUILTIN, builtin=f"{size}-s{seed}")
    if ref.startswith("builtin:"):
        raise BadModelRef(f"unknown built-in model {ref!r}; built-ins are builtin:tiny[-sN] and builtin:mid[-sN]")

    if ref.startswith("versions/") or ref.startswith("versions\\"):
        m = _VERSION.match(ref)
        if not m:
            raise BadModelRef(f"{ref!r} is not a published version; write 'versions/N' with N a number (no '..')")
        return ModelRef(raw=ref, kind=RefKind.VERSION, version=int(m.group(1)))

    if ref.startswith(("/", "./", "../", "~")) or "\\" in ref:
        if not allow_directories:
            raise BadModelRef(f"local paths are not allowed here ({ref!r}); use a repo id or 'versions/N'")
        if ".." in Path(ref).parts:  # the allowed forms are absolute or under ./; '..' only hides where it points
            raise BadModelRef(f"'..' is not allowed in a model path ({ref!r}); give an absolute path or one "
                              "starting with './'")
        try:
            path = Path(ref).expanduser()
        except RuntimeError:  # ~someone with no such user (or no home): not a folder here
            raise BadModelRef(f"model directory {ref!r} names a home folder that does not exist here") from None
        if not path.is_dir():
            raise BadModelRef(f"model directory {ref!r} does not exist or is not a directory")
        return ModelRef(raw=ref, kind=RefKind.DIRECTORY, path=path.resolve())

    repo, _, revision = ref.partition("@")
    if ".." in repo or "--" in repo or not _REPO_ID.match(repo):
        raise BadModelRef(f"{ref!r} is not a valid model reference; expected {ALLOWED_FORMS}")
    if revision and not re.match(r"^[A-Za-z0-9_.\-/]{1,128}$", revision):
        raise BadModelRef(f"revision {revision!r} of {repo!r} is malformed")
    return ModelRef(raw=ref, kind=RefKind.REPO, repo_id=repo, revision=revision or None)

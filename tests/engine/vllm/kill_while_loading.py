"""Child of test_vllm_engine's orphan test: start a vLLM engine on argv[1]; the test SIGKILLs it mid-load."""

from __future__ import annotations

import sys

from lockstep.engine.vllm import VllmConfig, VllmEngine

if __name__ == "__main__":
    engine = VllmEngine(VllmConfig(sys.argv[1], dtype="float32", enforce_eager=True, kv_cache_gib=0.25)).start()
    print("READY", flush=True)
    sys.stdin.read()

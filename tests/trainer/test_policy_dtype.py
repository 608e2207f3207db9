"""The trainer trains in float32 whatever LOCKSTEP_DTYPE (the serving dtype) says: its weights are the file's."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from lockstep.core.settings import load_settings
from lockstep.trainer.runs.policy import Policy


def test_the_policy_loads_the_files_float32_weights_when_serving_is_bfloat16(builtin_dir: Path) -> None:
    # dtype=auto resolves to bfloat16 on a CPU with AMX-BF16 or AVX512-BF16; naming it stands in for one here.
    settings = load_settings(builtin_dir=builtin_dir, device="cpu", dtype="bfloat16")
    policy = Policy.load("builtin:tiny", settings, None, learning_rate=1e-3)
    on_disk = load_file(str(builtin_dir / "tiny-s0" / "model.safetensors"))
    weights = policy.model.state_dict()
    assert {t.dtype for t in weights.values()} == {torch.float32}
    rounded = [n for n, t in on_disk.items() if not torch.equal(t.to(torch.bfloat16).float(), t)]
    assert rounded, "the file's weights survive bfloat16 unchanged: this test would prove nothing"
    for name, tensor in on_disk.items():
        assert torch.equal(weights[name], tensor), f"{name} differs from the file (rounded on the way in?)"

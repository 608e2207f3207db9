"""The replica builds its engines from the settings: prefill per step and chunked prefill, by device or set."""

from __future__ import annotations

from pathlib import Path

import pytest

from lockstep.inference.replica import default_engine_factory
from lockstep.models import loader
from tests.inference.conftest import replica_settings


@pytest.mark.parametrize(("chunk_setting", "engine_chunk"), [(0, 256), (-1, 0), (64, 64)],
                         ids=["auto-on-cpu", "off", "set"])
def test_prefill_chunk_tokens_reach_the_engine(builtin_dir: Path, chunk_setting: int, engine_chunk: int) -> None:
    settings = replica_settings(builtin_dir, prefill_chunk_tokens=chunk_setting, step_prefill_tokens=0)
    loaded = loader.load(loader.resolve("builtin:tiny", settings), settings)
    engine = default_engine_factory(loaded, settings)
    try:
        assert engine.prefill_chunk_tokens == engine_chunk
        assert engine.step_prefill_tokens == 32  # 0: by device
    finally:
        engine.close()


def test_a_chunk_setting_below_minus_one_is_refused(builtin_dir: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="prefill_chunk_tokens|LOCKSTEP_PREFILL_CHUNK_TOKENS"):
        replica_settings(builtin_dir, prefill_chunk_tokens=-2)

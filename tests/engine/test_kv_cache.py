"""The paged KV cache lends each block to one slot at a time and gets every block back."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lockstep.engine.kv_cache import BLOCK_SIZE, NULL_BLOCK, KVCache, blocks_for


def cache(num_blocks: int = 6, slots: int = 4) -> KVCache:
    return KVCache(n_layers=1, num_blocks=num_blocks, max_slots=slots, n_kv_heads=1, head_dim=2,
                   dtype=torch.float32, device=torch.device("cpu"))


def test_reserve_lends_whole_blocks_and_refuses_without_lending_part() -> None:
    kv = cache(num_blocks=3)
    assert kv.reserve(0, BLOCK_SIZE + 1) and kv.tables[0] == [1, 2] and kv.free_blocks == 1
    assert kv.reserve(0, 2) and kv.free_blocks == 1  # already held
    assert not kv.reserve(1, 2 * BLOCK_SIZE) and kv.tables[1] == [] and kv.free_blocks == 1
    kv.release(0)
    assert kv.free_blocks == 3 and kv.reserve(1, 3 * BLOCK_SIZE)


def test_move_takes_the_table_and_refuses_an_occupied_slot() -> None:
    kv = cache()
    kv.reserve(0, 1)
    kv.reserve(2, 1)
    with pytest.raises(RuntimeError, match="release it before a move"):
        kv.move(2, 0)
    kv.release(0)
    kv.move(2, 0)
    assert kv.tables[0] == [2] and kv.tables[2] == []
    kv.move(0, 0)  # a sequence joining the batch in the slot it was prefilled in
    assert kv.tables[0] == [2]


def test_a_dirty_release_zeroes_the_blocks_and_padding_reads_the_null_block() -> None:
    kv = cache()
    kv.reserve(0, 3)
    rows = kv.positions(kv.tables[0], 0, 3)
    kv.k[0][rows] = float("nan")
    kv.release(0, zero=True)
    assert torch.isfinite(kv.k[0]).all()
    kv.reserve(1, BLOCK_SIZE + 2)
    index = kv.gather_index([1, 2], width=BLOCK_SIZE + 2)
    assert index.shape == (2, BLOCK_SIZE + 2)
    assert (index[1] // BLOCK_SIZE == NULL_BLOCK).all()  # slot 2 holds nothing
    assert index[0].tolist() == kv.positions(kv.tables[1], 0, BLOCK_SIZE + 2).tolist()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["reserve", "release", "move"]), st.integers(0, 3),
                          st.integers(0, 3), st.integers(1, 4 * BLOCK_SIZE)), max_size=40))
def test_no_block_is_ever_lent_twice_or_lost(ops: list[tuple[str, int, int, int]]) -> None:
    kv = cache(num_blocks=6)
    for op, slot, other, tokens in ops:
        if op == "reserve":
            held = len(kv.tables[slot])
            ok = kv.reserve(slot, tokens)
            assert len(kv.tables[slot]) == (max(held, blocks_for(tokens)) if ok else held)
        elif op == "release":
            kv.release(slot)
        elif not kv.tables[other] or other == slot:
            kv.move(slot, other)
        lent = [b for table in kv.tables for b in table]
        assert len(lent) == len(set(lent)) and NULL_BLOCK not in lent
        assert len(lent) + kv.free_blocks == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cpu_cache_is_zero_and_takes_memory_only_where_written(dtype: torch.dtype) -> None:
    import psutil

    process = psutil.Process()
    before = process.memory_info().rss
    kv = KVCache(n_layers=2, num_blocks=8191, max_slots=4, n_kv_heads=4, head_dim=64, dtype=dtype,
                 device=torch.device("cpu"))  # 4 tensors of 8192 blocks × 16 positions × 256 values
    assert kv.k[0].shape == (8192 * BLOCK_SIZE, 4, 64) and kv.k[0].dtype == dtype
    assert kv.nbytes >= 256 * 2**20
    assert process.memory_info().rss - before < kv.nbytes // 4  # reserved, not written
    kv.reserve(0, 3)
    rows = kv.positions(kv.tables[0], 0, 3)
    kv.k[1][rows] = 1.5
    assert float(kv.k[1][rows].sum()) == 1.5 * 3 * 4 * 64
    assert not kv.k[1][: BLOCK_SIZE].any() and not kv.v[1].any()  # the null block and everything unwritten

"""Paged key/value cache: a pool of fixed-size blocks of positions, lent to sequences per request."""

from __future__ import annotations

import numpy as np
import torch

BLOCK_SIZE = 16  # positions per block: at most 15 reserved positions of a sequence go unused
NULL_BLOCK = 0  # never lent: always zero, it stands in for the positions a row of a batch does not have


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks that hold ``tokens`` positions."""
    return -(-tokens // block_size)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor whose host pages are touched only when written.

    ``torch.zeros`` on a CPU writes every byte up front: a 512 MiB cache costs a second or more of page faults
    while a new version stages. ``calloc`` (numpy's zeros) maps fresh pages that the kernel hands out zeroed on
    first use, so allocating is immediate and unused positions cost no memory.
    """
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class KVCache:
    """K and V per layer, each ``[(num_blocks + 1) * block_size, n_kv_heads, head_dim]`` (position-major).

    A sequence reserves, when admitted, the blocks for its prompt plus its ``max_new_tokens`` (``reserve``), so
    memory follows what requests ask for rather than the full context, and a running sequence never runs out.
    Its slot keeps the table of its blocks; compaction moves a table, not the values (``move``).
    Zero-filled so never-written positions are finite (a masked NaN would still poison attention).
    """

    def __init__(self, n_layers: int, num_blocks: int, max_slots: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, block_size: int = BLOCK_SIZE) -> None:
        if num_blocks < 1 or max_slots < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block, slot and position per block, got "
                             f"{num_blocks} blocks, {max_slots} slots, {block_size} positions per block")
        shape = ((num_blocks + 1) * block_size, n_kv_heads, head_dim)  # + the null block
        self.k = [zeros(shape, dtype, device) for _ in range(n_layers)]
        self.v = [zeros(shape, dtype, device) for _ in range(n_layers)]
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.device = device
        self.tables: list[list[int]] = [[] for _ in range(max_slots)]
        self._free = list(range(num_blocks, NULL_BLOCK, -1))  # a stack: the lowest block is lent first

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def free_blocks(self) -> int:
        """Blocks no sequence holds."""
        return len(self._free)

    def reserve(self, slot: int, tokens: int) -> bool:
        """Lend ``slot`` the blocks for ``tokens`` positions (beyond those it holds); False, lending nothing,
        when too few are free now."""
        table = self.tables[slot]
        need = blocks_for(tokens, self.block_size) - len(table)
        if need > len(self._free):
            return False
        for _ in range(max(0, need)):
            table.append(self._free.pop())
        return True

    def release(self, slot: int, zero: bool = False) -> None:
        """Return ``slot``'s blocks to the pool; ``zero`` first clears them (they may hold non-finite values)."""
        table, self.tables[slot] = self.tables[slot], []
        if zero and table:
            rows = self.positions(table, 0, len(table) * self.block_size)
            for t in (*self.k, *self.v):
                t[rows] = 0
        self._free.extend(reversed(table))

    def move(self, src: int, dst: int) -> None:
        """The sequence in slot ``src`` now lives in slot ``dst`` (which holds nothing): its table moves."""
        if src == dst:
            return
        if self.tables[dst]:
            raise RuntimeError(f"slot {dst} still holds {len(self.tables[dst])} blocks; release it before a move")
        self.tables[dst], self.tables[src] = self.tables[src], []

    def copy_prefix(self, copies: list[tuple[int, int, int]]) -> None:
        """For each ``(src, dst, length)``: positions ``0..length-1`` of slot ``dst`` get slot ``src``'s K/V (both
        slots already hold the blocks)."""
        if not copies:
            return
        src = torch.cat([self.positions(self.tables[s], 0, n) for s, _, n in copies])
        dst = torch.cat([self.positions(self.tables[d], 0, n) for _, d, n in copies])
        for t in (*self.k, *self.v):
            t[dst] = t.index_select(0, src)

    def positions(self, table: list[int], start: int, end: int) -> torch.Tensor:
        """Rows of the pool that hold positions ``start..end-1`` of the sequence whose blocks are ``table``."""
        offsets = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[offsets // self.block_size]
        return (blocks * self.block_size + offsets % self.block_size).to(self.device)

    def gather_index(self, slots: list[int], width: int) -> torch.Tensor:
        """Pool rows of positions ``0..width-1`` of each slot ``[len(slots), width]``; positions a slot holds no
        block for read the null block (zeros, masked by the caller)."""
        n_blocks = blocks_for(width, self.block_size)
        table = torch.full((len(slots), n_blocks), NULL_BLOCK, dtype=torch.long)
        for row, slot in enumerate(slots):
            blocks = self.tables[slot][:n_blocks]
            if blocks:
                table[row, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        rows = table[:, :, None] * self.block_size + torch.arange(self.block_size)
        return rows.view(len(slots), -1)[:, :width].contiguous().to(self.device)

    def close(self) -> None:
        """Drop the tensors so their memory can be released."""
        self.k, self.v = [], []
        self.tables, self._free = [], []

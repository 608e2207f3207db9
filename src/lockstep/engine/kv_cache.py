"""Preallocated slot-based key/value cache: one row per running sequence, per layer."""

from __future__ import annotations

import torch


class KVCache:
    """K and V per layer, each ``[max_batch_size, n_kv_heads, max_context, head_dim]``.

    Memory: 2 * layers * batch * kv_heads * context * head_dim * dtype bytes, allocated once.
    Zero-filled so never-written positions are finite (a masked NaN would still poison attention).
    """

    def __init__(self, n_layers: int, max_batch_size: int, n_kv_heads: int, max_context: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (max_batch_size, n_kv_heads, max_context, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_batch_size = max_batch_size
        self.max_context = max_context

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (batch compaction)."""
        for t in (*self.k, *self.v):
            t[dst, :, :length].copy_(t[src, :, :length])

    def zero(self, slot: int) -> None:
        """Clear a slot whose values may be non-finite (after a failed step)."""
        for t in (*self.k, *self.v):
            t[slot].zero_()

    def close(self) -> None:
        """Drop the tensors so their memory can be released."""
        self.k, self.v = [], []

"""Batched prefill/decode for Llama-family models over the model's own submodules and our KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lockstep.engine.kv_cache import BLOCK_SIZE, KVCache, blocks_for

# Model types whose decoder layer is exactly: pre-norm → q/k/v (+ optional per-head q/k norm) → RoPE →
# causal attention → o_proj → residual → pre-norm → mlp → residual, with unscaled embeddings.
# Checked against HF logits in tests; anything else takes the generic path.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# store(layer, k, v) -> the K and V to attend to; attend(layer, q, k, v, scale) -> the attention output.
Store = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sliding_window(model: Any) -> int | None:
    """The attention window if any layer uses one, else None."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:
        used = "sliding_attention" in layer_types
    else:
        used = window is not None and getattr(cfg, "use_sliding_window", True)
    windows = [getattr(layer.self_attn, "sliding_window", None) for layer in model.model.layers]
    found = [w for w in windows if w] + ([window] if used and window else [])
    return min(found) if found else None


def supports(model: Any, max_context: int) -> bool:
    """Whether ``LlamaRunner`` reproduces this model exactly up to ``max_context`` tokens."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        return False
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return False
        if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return False
    window = _sliding_window(model)
    return window is None or window >= max_context


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` [B, H, L, D] with cos/sin [B, L, D] from the model's rotary module."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


@dataclass(frozen=True)
class DistinctPrompts:
    """A wave's prompts with repeats taken out: a request for n answers submits its prompt n times, and the
    forward pass needs it once; each repeat then gets a copy of its K/V and its logits row."""

    prompts: list[list[int]]  # each distinct prompt once, in order of first appearance
    slots: list[int]  # the slot of each distinct prompt's first appearance
    rows: list[int]  # for each prompt of the wave, the index of its distinct prompt
    copies: list[tuple[int, int, int]]  # (slot with the K/V, slot of a repeat, prompt length)


def distinct_prompts(prompts: list[list[int]], slots: list[int]) -> DistinctPrompts:
    """``prompts`` (going to ``slots``) with every repeat of an earlier prompt taken out."""
    first: dict[tuple[int, ...], int] = {}
    unique: list[list[int]] = []
    unique_slots: list[int] = []
    rows: list[int] = []
    copies: list[tuple[int, int, int]] = []
    for prompt, slot in zip(prompts, slots, strict=True):
        index = first.setdefault(tuple(prompt), len(unique))
        if index == len(unique):
            unique.append(prompt)
            unique_slots.append(slot)
        else:
            copies.append((unique_slots[index], slot, len(prompt)))
        rows.append(index)
    return DistinctPrompts(unique, unique_slots, rows, copies)


class LlamaRunner:
    """Owns the paged KV cache; prefill writes prompts into slots, decode advances slots ``0..B-1`` by one token."""

    name = "llama"

    def __init__(self, model: Any, max_batch_size: int, max_context: int, kv_tokens: int | None = None) -> None:
        """``kv_tokens``: positions the cache holds across all sequences (default: every slot at full context)."""
        self._model = model
        cfg = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        attn = model.model.layers[0].self_attn
        self._head_dim = int(getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self._n_heads = int(cfg.num_attention_heads)
        self._n_kv = int(getattr(cfg, "num_key_value_heads", None) or self._n_heads)
        tokens = max_batch_size * blocks_for(max_context) * BLOCK_SIZE if kv_tokens is None else kv_tokens
        self.cache = KVCache(len(model.model.layers), blocks_for(tokens), max_batch_size, self._n_kv,
                             self._head_dim, self.dtype, self.device)

    def _hold(self, slot: int, tokens: int) -> None:
        """Make sure ``slot`` holds blocks for ``tokens`` positions (the engine reserved them at admission)."""
        if not self.cache.reserve(slot, tokens):
            raise RuntimeError(f"the KV cache has no free block for position {tokens - 1} of slot {slot}; "
                               "reserve a sequence's positions when it is admitted")

    def _wave(self, prompts: list[list[int]], slots: list[int]) -> DistinctPrompts:
        """Blocks for every prompt of a wave in its slot, and the wave's distinct prompts (the forward's work)."""
        for slot, prompt in zip(slots, prompts, strict=True):
            self._hold(slot, len(prompt))
        return distinct_prompts(prompts, slots)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
        causal = mask is None  # only for a single unpadded prompt
        if self._n_kv == self._n_heads:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
        if _SDPA_HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                  enable_gqa=True)
        rep = self._n_heads // self._n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)

    def _layers(self, h: torch.Tensor, pos: torch.Tensor, attend: Attend,
                interleave: Callable[[], None] | None = None) -> torch.Tensor:
        """Run every decoder layer on ``h`` [B, L, hidden]; ``attend(i, q, k, v, scale)`` caches layer ``i``'s new
        K/V and returns the attention output for ``q`` [B, heads, L, head dim].

        ``interleave`` is called before each layer: the state of this pass is just ``h``, so other slots'
        work can run there without disturbing it."""
        inner = self._model.model
        cos, sin = inner.rotary_emb(h, pos)
        b, n, _ = h.shape
        for i, layer in enumerate(inner.layers):
            if interleave is not None:
                interleave()
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, n, -1, self._head_dim)
            k = attn.k_proj(x).view(b, n, -1, self._head_dim)
            v = attn.v_proj(x).view(b, n, -1, self._head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before RoPE
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = _rope(q.transpose(1, 2), cos, sin)
            k = _rope(k.transpose(1, 2), cos, sin)
            scale = float(getattr(attn, "scaling", self._head_dim**-0.5))
            o = attend(i, q, k, v.transpose(1, 2), scale)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, n, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h

    def _masked(self, store: Store, mask: torch.Tensor | None) -> Attend:
        """Attention over what ``store`` returns for each layer, under one ``mask`` (None: causal)."""
        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            k_all, v_all = store(i, k, v)
            return self._attention(q, k_all, v_all, mask, scale)
        return attend

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self._model.lm_head(self._model.model.norm(h)).float()

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Write each prompt's K/V into its slot; return float32 logits of each prompt's last token [N, V].
        A prompt repeated in the wave goes through the model once (``distinct_prompts``)."""
        wave = self._wave(prompts, slots)
        logits = self._prefill_distinct(wave.prompts, wave.slots)
        self.cache.copy_prefix(wave.copies)
        return logits[wave.rows] if wave.copies else logits

    def _prefill_distinct(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        lens = [len(p) for p in prompts]
        n, width = len(prompts), max(lens)
        ids = torch.zeros((n, width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(self.device)
        lens_t = torch.tensor(lens, device=self.device)
        ar = torch.arange(width, device=self.device)
        pos = ar.unsqueeze(0).expand(n, width)
        mask = None
        if n > 1 or width != lens[0]:
            # Right padding: query i sees keys j <= i that are real tokens of its own prompt.
            causal = (ar[None, :] <= ar[:, None])[None, None]  # [1, 1, W, W]
            mask = causal & (ar[None, None, None, :] < lens_t[:, None, None, None])  # [N, 1, W, W]
        cache = self.cache
        # Only real tokens are written (row-major, as the boolean mask selects them); padding never is.
        write = torch.cat([cache.positions(cache.tables[slot], 0, length) for slot, length in zip(slots, lens,
                                                                                                   strict=True)])
        real = ar[None, :] < lens_t[:, None]  # [N, W]

        def store(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            cache.k[i][write] = k.transpose(1, 2)[real]
            cache.v[i][write] = v.transpose(1, 2)[real]
            return k, v  # a prompt attends only to itself

        h = self._layers(self._model.model.embed_tokens(ids), pos, self._masked(store, mask))
        last = h[torch.arange(n, device=self.device), lens_t - 1]
        return self._logits(last)

    def prefill_chunk(self, tokens: list[int], slot: int, start: int) -> torch.Tensor:
        """Extend ``slot``'s cached prompt by ``tokens`` at positions ``start..``; logits of the last [1, V]."""
        n = len(tokens)
        end = start + n
        ids = torch.tensor([tokens], dtype=torch.long).to(self.device)
        pos = torch.arange(start, end, device=self.device).unsqueeze(0)
        # Query i (position start + i) sees every cached position and the chunk's own up to itself.
        mask = (torch.arange(end, device=self.device)[None, :] <= pos[0, :, None])[None, None]  # [1, 1, n, end]
        cache = self.cache
        self._hold(slot, end)
        table = cache.tables[slot]
        write, read = cache.positions(table, start, end), cache.positions(table, 0, end)

        def store(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kc, vc = cache.k[i], cache.v[i]
            kc[write] = k[0].transpose(0, 1)
            vc[write] = v[0].transpose(0, 1)
            return kc[read].transpose(0, 1).unsqueeze(0), vc[read].transpose(0, 1).unsqueeze(0)

        h = self._layers(self._model.model.embed_tokens(ids), pos, self._masked(store, mask))
        return self._logits(h[:, -1])

    def decode(self, tokens: list[int], positions: list[int],
               interleave: Callable[[], None] | None = None) -> torch.Tensor:
        """One step for slots ``0..B-1``: feed ``tokens[b]`` at ``positions[b]``; return logits [B, V].

        ``interleave`` runs before each layer; it may prefill slots ``>= B`` (this step reads and writes only
        the blocks of slots ``< B``)."""
        b = len(tokens)
        ids = torch.tensor(tokens, dtype=torch.long).to(self.device).unsqueeze(1)
        pos = torch.tensor(positions, dtype=torch.long).to(self.device)
        width = max(positions) + 1  # attend over the longest sequence's span only
        mask = (torch.arange(width, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]
        cache = self.cache
        bs = cache.block_size
        for slot, position in enumerate(positions):
            self._hold(slot, position + 1)
        write = torch.tensor([cache.tables[slot][p // bs] * bs + p % bs for slot, p in enumerate(positions)],
                             dtype=torch.long, device=self.device)
        read = cache.gather_index(list(range(b)), width).view(-1)

        def store(i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            kc, vc = cache.k[i], cache.v[i]
            kc[write] = k[:, :, 0]
            vc[write] = v[:, :, 0]
            k_all = kc.index_select(0, read).view(b, width, self._n_kv, self._head_dim).transpose(1, 2)
            v_all = vc.index_select(0, read).view(b, width, self._n_kv, self._head_dim).transpose(1, 2)
            return k_all, v_all

        h = self._layers(self._model.model.embed_tokens(ids), pos.unsqueeze(1), self._masked(store, mask),
                         interleave)
        return self._logits(h[:, 0])

    def step(self, tokens: list[int], positions: list[int], prompts: list[list[int]],
             slots: list[int]) -> torch.Tensor:
        """A decode step for slots ``0..B-1`` and the prefill of ``prompts`` into ``slots`` in one forward pass,
        so the weights are read once for both; logits [B + N, V]: the B decode rows, then each prompt's last.

        Every token is one position of one flat sequence (no padding): decode rows attend to their cached
        positions, each prompt causally to itself. A prompt repeated in the wave goes through once."""
        wave = self._wave(prompts, slots)
        logits = self._step_distinct(tokens, positions, wave.prompts, wave.slots)
        self.cache.copy_prefix(wave.copies)
        if not wave.copies:
            return logits
        b = len(tokens)
        return logits[list(range(b)) + [b + row for row in wave.rows]]

    def _step_distinct(self, tokens: list[int], positions: list[int], prompts: list[list[int]],
                       slots: list[int]) -> torch.Tensor:
        b = len(tokens)
        lens = [len(p) for p in prompts]
        flat = tokens + [t for p in prompts for t in p]
        ids = torch.tensor([flat], dtype=torch.long).to(self.device)
        pos = torch.tensor([positions + [i for n in lens for i in range(n)]], dtype=torch.long).to(self.device)
        cache = self.cache
        bs = cache.block_size
        for slot, position in enumerate(positions):
            self._hold(slot, position + 1)
        decode_rows = [cache.tables[slot][p // bs] * bs + p % bs for slot, p in enumerate(positions)]
        write = torch.cat([torch.tensor(decode_rows, dtype=torch.long, device=self.device)]
                          + [cache.positions(cache.tables[slot], 0, n) for slot, n in zip(slots, lens, strict=True)])
        width = max(positions, default=0) + 1
        read = cache.gather_index(list(range(b)), width).view(-1) if b else None
        mask = (torch.arange(width, device=self.device)[None, :] <= pos[0, :b, None])[:, None, None, :]
        starts = [b + sum(lens[:j]) for j in range(len(lens))]

        def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
            kc, vc = cache.k[i], cache.v[i]
            kc[write] = k[0].transpose(0, 1)
            vc[write] = v[0].transpose(0, 1)
            parts = []
            if read is not None:
                k_all = kc.index_select(0, read).view(b, width, self._n_kv, self._head_dim).transpose(1, 2)
                v_all = vc.index_select(0, read).view(b, width, self._n_kv, self._head_dim).transpose(1, 2)
                out = self._attention(q[0, :, :b].transpose(0, 1).unsqueeze(2), k_all, v_all, mask, scale)
                parts.append(out.squeeze(2).transpose(0, 1))  # [heads, B, head dim]
            for start, n in zip(starts, lens, strict=True):
                span = slice(start, start + n)
                parts.append(self._attention(q[:, :, span], k[:, :, span], v[:, :, span], None, scale)[0])
            return torch.cat(parts, dim=1).unsqueeze(0)

        h = self._layers(self._model.model.embed_tokens(ids), pos, attend)
        last = list(range(b)) + [start + n - 1 for start, n in zip(starts, lens, strict=True)]
        return self._logits(h[0, torch.tensor(last, device=self.device)])

    def decode_one(self, token: int, position: int, slot: int) -> torch.Tensor:
        """``token`` at ``position`` of ``slot`` alone; logits [1, V]. It overwrites whatever a failed batched
        step left at that position, so it may follow one."""
        return self.prefill_chunk([token], slot, position)

    def reserve(self, slot: int, tokens: int) -> bool:
        """Set aside blocks for ``tokens`` positions of the sequence admitted to ``slot``; False when the cache
        has too few free now (the sequence waits for others to finish)."""
        return self.cache.reserve(slot, tokens)

    def move(self, src: int, dst: int, length: int) -> None:
        """Move a sequence from slot ``src`` to ``dst`` (compaction after a sequence leaves): its block table."""
        self.cache.move(src, dst)

    def release(self, slot: int, dirty: bool) -> None:
        """Return a slot's blocks; ``dirty`` (a failed step) clears them so no NaN survives into the next one."""
        self.cache.release(slot, zero=dirty)

    def close(self) -> None:
        self.cache.close()
        self._model = None

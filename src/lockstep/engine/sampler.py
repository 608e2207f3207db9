"""Turn a batch of logits into next tokens: greedy rows by argmax, sampled rows with their own generator."""

from __future__ import annotations

import torch

from lockstep.engine.sampling_params import SamplingParams


def bad_rows(logits: torch.Tensor) -> torch.Tensor:
    """Rows that cannot be sampled from: any NaN or +inf, or nothing finite. Shape [B] bool."""
    return torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1) | torch.isneginf(logits).all(-1)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Apply per-row temperature, top-k (0 = off) and top-p (1 = off); returns probabilities [B, V]."""
    scaled = logits / temperature.unsqueeze(-1)
    vocab = scaled.shape[-1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        kmax = int(k.max())
        kth = scaled.topk(kmax, dim=-1).values.gather(-1, (k - 1).unsqueeze(-1))  # k-th largest per row
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if bool((top_p < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p.unsqueeze(-1)
        drop_sorted &= (top_p < 1).unsqueeze(-1)  # rows with top_p 1 keep even their rounding-error tail
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """Next token per row of ``logits`` [B, V] (float32) → LongTensor [B] on the logits' device."""
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    dev = logits.device
    idx = torch.tensor(rows, device=dev)
    probs = filter_logits(
        logits.index_select(0, idx),
        torch.tensor([params[i].temperature for i in rows], device=dev, dtype=logits.dtype),
        torch.tensor([params[i].top_k for i in rows], device=dev),
        torch.tensor([params[i].top_p for i in rows], device=dev, dtype=logits.dtype),
    )
    # One multinomial per row: each request owns its generator, so its stream does not depend on the batch.
    picked = [torch.multinomial(probs[j], 1, generator=generators[i]) for j, i in enumerate(rows)]
    tokens[idx] = torch.cat(picked)
    return tokens

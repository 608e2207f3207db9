"""Turn a batch of logits into next tokens: greedy rows by argmax, sampled rows with their own generator.

Rows never decide each other's token: a row whose settings drive the arithmetic out of float range (a
temperature or top_p that underflows) takes the token those settings tend to, the argmax, and a row whose draw
fails is reported on its own while every other row still gets its token.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field, replace

import torch

from lockstep.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Draws:
    """The next token of each row, why a row has none (row index → message), and the log-probability of each
    chosen token for the rows that asked for it (``SamplingParams.logprobs``)."""

    tokens: list[int]
    errors: dict[int, str]
    logprobs: dict[int, float] = field(default_factory=dict)


def bad_rows(logits: torch.Tensor) -> torch.Tensor:
    """Rows that cannot be sampled from: any NaN or +inf, or nothing finite. Shape [B] bool."""
    # A row's max is NaN when it holds a NaN (max propagates it), +inf when it holds one, -inf when nothing is
    # finite: one reduction, where three masks of the row's size cost 1.4 ms a step at a 32k vocabulary.
    return ~torch.isfinite(logits.amax(-1))


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Apply per-row temperature, top-k (0 = off) and top-p (1 = off); returns probabilities [B, V].

    A row may come out non-finite or all zero when its temperature underflows; ``sample`` handles that row."""
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
        # Drop a token when the mass before it already reaches top_p. The top token always stays, even when
        # top_p underflowed to 0 in the logits' dtype.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p.unsqueeze(-1)
        drop_sorted[:, 0] = False
        drop_sorted &= (top_p < 1).unsqueeze(-1)  # rows with top_p 1 keep even their rounding-error tail
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _filtered(logits: torch.Tensor, params: list[SamplingParams], rows: list[int]) -> torch.Tensor:
    """Probabilities [len(rows), V] of the given rows under their own settings."""
    dev, vocab = logits.device, logits.shape[-1]
    idx = torch.tensor(rows, device=dev)
    return filter_logits(
        logits.index_select(0, idx),
        torch.tensor([params[i].temperature for i in rows], device=dev, dtype=logits.dtype),
        torch.tensor([min(params[i].top_k, vocab) for i in rows], device=dev),
        torch.tensor([params[i].top_p for i in rows], device=dev, dtype=logits.dtype),
    )


def _usable(probs: torch.Tensor) -> list[bool]:
    """Rows that are a distribution to draw from: finite, with some mass (checked before any draw: on a GPU a
    draw from a NaN row is a device-side assert that breaks every later kernel, not an exception)."""
    mass = probs.sum(-1)  # probabilities are >= 0 and <= 1: the sum is finite exactly when every entry is
    return (torch.isfinite(mass) & (mass > 0)).tolist()  # type: ignore[no-any-return]


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> Draws:
    """Next token per row of ``logits`` [B, V] (float32, finite rows); a failing row is reported, not raised."""
    tokens: list[int] = logits.argmax(-1).tolist()
    errors: dict[int, str] = {}
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return Draws(tokens, errors, chosen_logprobs(logits, params, tokens))
    try:
        probs: torch.Tensor | None = _filtered(logits, params, rows)
        usable = _usable(probs)
    except Exception:  # one row's settings broke the batched filter: filter each row alone below
        probs, usable = None, []
    drawn_from: dict[int, torch.Tensor] = {}  # row → the distribution its token is drawn from
    points: dict[int, float] = {}  # row → its uniform draw in [0, 1)
    for j, i in enumerate(rows):
        try:
            if probs is not None:
                row, ok = probs[j], usable[j]
            else:
                alone = _filtered(logits, params, [i])
                row, ok = alone[0], _usable(alone)[0]
            if ok:  # else the settings' limit (temperature or top_p -> 0) is the argmax, already in tokens
                # Each request owns its generator, so its stream does not depend on the batch: one number per
                # token, where torch.multinomial would draw one per vocabulary entry.
                points[i] = float(torch.rand((), generator=generators[i], dtype=torch.float64))
                drawn_from[i] = row
        except Exception as exc:
            errors[i] = f"sampling failed: {type(exc).__name__}: {exc}"
    if drawn_from:
        for i, token in zip(drawn_from, inverse_cdf(torch.stack(list(drawn_from.values())),
                                                     list(points.values())), strict=True):
            tokens[i] = token
    # Rows drawn from a distribution read their token's log-probability off it; only the rest filter again.
    asked = [i for i in drawn_from if params[i].logprobs]
    drawn = dict(zip(asked, torch.stack([drawn_from[i][tokens[i]] for i in asked]).log().tolist(), strict=True)
                 ) if asked else {}
    rest = chosen_logprobs(logits, params, tokens, skip=errors.keys() | drawn.keys())
    return Draws(tokens, errors, {**rest, **drawn})


def inverse_cdf(probs: torch.Tensor, points: list[float]) -> list[int]:
    """For each row of ``probs`` [N, V] (finite, some mass) the token whose cumulative share of the row's mass
    first exceeds ``points[row]`` (in [0, 1)): a draw from the row's distribution. Each row is summed on its
    own, in float64, so a row's token does not depend on the other rows."""
    cdf = probs.double().cumsum(-1)
    targets = torch.tensor(points, dtype=torch.float64).unsqueeze(-1) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, targets, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)
    out: list[int] = picked.tolist()
    # Rounding can put a target at the very end, past the last token with mass: that token, then.
    for row in torch.nonzero(probs.gather(-1, picked.unsqueeze(-1)).squeeze(-1) == 0).flatten().tolist():
        out[row] = int(torch.nonzero(probs[row]).max())
    return out


def chosen_logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int],
                    skip: Collection[int] = ()) -> dict[int, float]:
    """Log-probability of each chosen token, for the rows that asked, in the distribution the row samples from:
    logits / temperature, then top-k and top-p, renormalised (vLLM's ``processed_logprobs``, what TRL's
    importance-sampling correction expects). A greedy row reports the raw distribution (temperature counted as
    1). A row whose distribution underflowed reports what the arithmetic gives (-inf or NaN)."""
    rows = [i for i, p in enumerate(params) if p.logprobs and i not in skip]
    if not rows:
        return {}
    greedy_as_one = list(params)
    for i in rows:
        if params[i].temperature == 0.0:
            greedy_as_one[i] = replace(params[i], temperature=1.0)
    try:
        probs = _filtered(logits, greedy_as_one, rows)
    except Exception:  # one row's settings broke the batched filter (as in ``sample``): that row reports NaN
        return {i: _one_logprob(logits, greedy_as_one, i, tokens[i]) for i in rows}
    picked = probs.gather(-1, torch.tensor([[tokens[i]] for i in rows], device=probs.device)).squeeze(-1)
    return dict(zip(rows, picked.log().tolist(), strict=True))


def _one_logprob(logits: torch.Tensor, params: list[SamplingParams], row: int, token: int) -> float:
    try:
        return float(_filtered(logits, params, [row])[0, token].log())
    except Exception:
        return math.nan

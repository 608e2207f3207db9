"""How far a candidate version is from the stable one on one served answer: token agreement and next-token KL.

Both models are teacher-forced on the served prompt + answer (one forward pass each) and compared at the answer's
positions. Blocking and compute-heavy: call it from a worker thread, never from the event loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lockstep.core.errors import NotReady, VerificationError
from lockstep.engine.vllm import VllmEngine
from lockstep.inference.slot import ModelSlot

TOP_K = 20  # vLLM's default max_logprobs: the most prompt logprobs per position it returns unless raised
VLLM_TIMEOUT_S = 300.0  # one prompt-logprobs request; vLLM on a busy CPU is slow, a hung engine is not waited on
_CHUNK = 64  # answer positions per float32 softmax: bounds the extra memory to a few chunk x vocab floats
_MIN_MASS = 1e-12  # below it a probability is rounding noise (1 - sum of the top-k can come out <= 0)

ServedBy = Literal["stable", "candidate"]


class IncompatibleModels(VerificationError):
    """The two versions do not share a vocabulary: their token ids and distributions cannot be compared."""


@dataclass(frozen=True)
class Comparison:
    """The candidate against the stable version on one prompt and served answer.

    ``agreement``: the fraction of the served answer's positions where the other model's token matches it (0..1).
    ``kl``: the mean over those positions of KL(P_stable || P_candidate) of the next-token distributions, in nats;
    ``approximate`` when it came from top-k logprobs (vLLM), which gives a lower bound of the exact value.
    """

    agreement: float
    kl: float
    positions: int
    approximate: bool = False


def compare(stable: ModelSlot, candidate: ModelSlot, prompt_ids: Sequence[int], answer_ids: Sequence[int],
            candidate_answer_ids: Sequence[int] | None = None, *, served_by: ServedBy = "stable") -> Comparison:
    """Compare ``candidate`` with ``stable`` on ``prompt_ids`` + the served ``answer_ids``.

    Agreement, over the served answer's length:

    - ``candidate_answer_ids`` given (a shadowed prompt: the candidate generated its own answer): the fraction of
      positions where the candidate's token equals the served one (a shorter answer disagrees where it has none);
    - otherwise the fraction where the argmax next token of the model that did *not* serve the answer, teacher-forced
      on the served prompt + answer, equals the served token: the candidate's when ``served_by="stable"`` (the
      default), the stable version's when ``served_by="candidate"`` (canary traffic). Either way it measures how
      often the other version would have written the same next token.

    The KL is always KL(P_stable || P_candidate), teacher-forced on the served text, whichever version served it.
    An empty answer has no position: agreement 1.0 when the candidate's answer is empty too (else 0.0), KL 0.0.
    Non-finite logits give ``kl = inf``. Raises ``IncompatibleModels`` when the vocabularies differ.
    """
    if served_by not in ("stable", "candidate"):
        raise ValueError(f"served_by must be 'stable' or 'candidate', got {served_by!r}")
    if served_by == "candidate" and candidate_answer_ids is not None:
        raise ValueError("candidate_answer_ids is for a shadowed prompt, which the stable version served")
    prompt = [int(t) for t in prompt_ids]
    answer = [int(t) for t in answer_ids]
    if not prompt:
        raise ValueError("the prompt is empty; the first answer token needs a prompt to be predicted from")
    vocab = _check_vocab(stable, candidate)
    out_of_range = [t for t in prompt + answer if not 0 <= t < vocab]
    if out_of_range:
        raise ValueError(f"token ids {out_of_range[:5]} are outside the vocabulary [0, {vocab})")
    if isinstance(stable.engine, VllmEngine) or isinstance(candidate.engine, VllmEngine):
        answer = answer[:_vllm_room(stable, candidate, len(prompt), len(answer))]
    if not answer:
        return Comparison(agreement=0.0 if candidate_answer_ids else 1.0, kl=0.0, positions=0)
    if candidate_answer_ids is not None:
        theirs = [int(t) for t in candidate_answer_ids]
        same = sum(1 for mine, other in zip(answer, theirs, strict=False) if mine == other)
        agreement: float | None = same / len(answer)
    else:
        agreement = None  # from the other model's argmax, below
    if isinstance(stable.engine, VllmEngine) or isinstance(candidate.engine, VllmEngine):
        return _compare_top_k(stable, candidate, prompt, answer, agreement, served_by)
    return _compare_exact(stable, candidate, prompt, answer, agreement, served_by)


# --------------------------------------------------------------------------------------------- vocabulary
def _check_vocab(stable: ModelSlot, candidate: ModelSlot) -> int:
    sizes = (_vocab_size(stable), _vocab_size(candidate))
    if sizes[0] != sizes[1]:
        raise IncompatibleModels(f"v{stable.version} has a vocabulary of {sizes[0]} tokens and v{candidate.version} "
                                 f"of {sizes[1]}; token agreement and KL need both versions to share one tokenizer")
    lengths = (_tokenizer_len(stable), _tokenizer_len(candidate))
    if None not in lengths and lengths[0] != lengths[1]:
        raise IncompatibleModels(f"the tokenizers of v{stable.version} ({lengths[0]} tokens) and "
                                 f"v{candidate.version} ({lengths[1]} tokens) differ; token agreement and KL need "
                                 "both versions to share one tokenizer")
    return sizes[0]


def _vocab_size(slot: ModelSlot) -> int:
    """The width of the model's next-token distribution."""
    if isinstance(slot.engine, VllmEngine):
        return slot.engine.vocab_size
    model = _model(slot)
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def _tokenizer_len(slot: ModelSlot) -> int | None:
    try:
        return len(slot.tokenizer)
    except TypeError:
        return None  # a tokenizer without a length: the vocabulary size check stands alone


def _model(slot: ModelSlot) -> Any:
    model = slot.loaded.model
    if model is None:
        raise NotReady(f"v{slot.version} was freed; there is no model to compare")
    return model


# --------------------------------------------------------------------------------------------- exact (torch)
def _compare_exact(stable: ModelSlot, candidate: ModelSlot, prompt: list[int], answer: list[int],
                   agreement: float | None, served_by: ServedBy) -> Comparison:
    ids = prompt + answer
    n = len(answer)
    with torch.inference_mode():
        logits_s = _answer_logits(_model(stable), ids, n)
        logits_c = _answer_logits(_model(candidate), ids, n)
        other = logits_c if served_by == "stable" else logits_s
        target = torch.tensor(answer, device=other.device)
        kl_total, same, finite = 0.0, 0, True
        for start in range(0, n, _CHUNK):
            s = logits_s[start:start + _CHUNK].float()
            c = logits_c[start:start + _CHUNK].to(device=s.device, dtype=torch.float32)
            if not (torch.isfinite(s).all() and torch.isfinite(c).all()):
                finite = False
            else:
                log_p, log_q = torch.log_softmax(s, dim=-1), torch.log_softmax(c, dim=-1)
                kl_total += float((log_p.exp() * (log_p - log_q)).sum(dtype=torch.float64))
            same += int((other[start:start + _CHUNK].argmax(dim=-1) == target[start:start + _CHUNK]).sum())
    return Comparison(agreement=same / n if agreement is None else agreement,
                      kl=max(0.0, kl_total / n) if finite else math.inf, positions=n)


def _answer_logits(model: Any, ids: list[int], n: int) -> torch.Tensor:
    """The logits that predict the last ``n`` tokens of ``ids`` ([n, vocab], the model's dtype)."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    try:
        # Only the answer's rows: the prompt's would cost len(prompt) x vocab floats for nothing.
        out = model(input_ids=x, logits_to_keep=n + 1, use_cache=False)
    except TypeError:  # an architecture without logits_to_keep
        out = model(input_ids=x, use_cache=False)
    logits: torch.Tensor = out.logits
    return logits[0, -(n + 1):-1]


# --------------------------------------------------------------------------------------------- top-k (vLLM)
def _vllm_room(stable: ModelSlot, candidate: ModelSlot, prompt_len: int, answer_len: int) -> int:
    """How many answer tokens fit one prompt-logprobs request: vLLM needs room for one generated token."""
    limit = min(engine.max_context for engine in (stable.engine, candidate.engine) if isinstance(engine, VllmEngine))
    return max(0, min(answer_len, limit - 1 - prompt_len))


Row = dict[int, float]  # token id → log probability, for the top-k tokens and the served one


def _compare_top_k(stable: ModelSlot, candidate: ModelSlot, prompt: list[int], answer: list[int],
                   agreement: float | None, served_by: ServedBy) -> Comparison:
    ids = prompt + answer
    n = len(answer)
    rows_s, rows_c = _top_k_rows(stable, ids, n), _top_k_rows(candidate, ids, n)
    other = rows_c if served_by == "stable" else rows_s
    same = sum(1 for row, token in zip(other, answer, strict=True) if max(row, key=row.__getitem__) == token)
    kl = sum(coarse_kl(p, q) for p, q in zip(rows_s, rows_c, strict=True)) / n
    return Comparison(agreement=same / n if agreement is None else agreement, kl=kl, positions=n, approximate=True)


def coarse_kl(p: Row, q: Row) -> float:
    """KL(p || q) over the tokens both rows know, with each distribution's remaining mass lumped into one outcome.

    Merging outcomes never increases a KL divergence, so this is a lower bound of the exact one; the served token is
    in both rows, so it is always compared exactly. ``inf`` when a log probability is NaN or q gives a token of p
    no mass."""
    kl = mass_p = mass_q = 0.0
    for token in p.keys() & q.keys():
        a, b = p[token], q[token]
        if math.isnan(a) or math.isnan(b):
            return math.inf
        if a == -math.inf:
            mass_q += math.exp(b)
            continue  # no mass under p: no term
        if b == -math.inf:
            return math.inf
        pa = math.exp(a)
        kl += pa * (a - b)
        mass_p += pa
        mass_q += math.exp(b)
    rest_p, rest_q = 1.0 - mass_p, 1.0 - mass_q
    if rest_p > _MIN_MASS:
        kl += rest_p * (math.log(rest_p) - math.log(max(rest_q, _MIN_MASS)))
    return max(0.0, kl)


def _top_k_rows(slot: ModelSlot, ids: list[int], n: int) -> list[Row]:
    """The top-k (and served token's) log probabilities at each of the last ``n`` positions of ``ids``."""
    if isinstance(slot.engine, VllmEngine):
        return _vllm_rows(slot, ids, n)
    # A built-in version beside a vLLM one: reduced to the same top-k rows, so both sides are alike.
    with torch.inference_mode():
        logits = _answer_logits(_model(slot), ids, n)
        rows: list[Row] = []
        for start in range(0, n, _CHUNK):
            log_p = torch.log_softmax(logits[start:start + _CHUNK].float(), dim=-1)
            top = torch.topk(log_p, k=min(TOP_K, log_p.shape[-1]), dim=-1)
            for i, (values, indices) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
                row = dict(zip(indices, values, strict=True))
                token = ids[len(ids) - n + start + i]
                row[token] = float(log_p[i, token])
                rows.append(row)
    return rows


def _vllm_rows(slot: ModelSlot, ids: list[int], n: int) -> list[Row]:
    engine = slot.engine
    assert isinstance(engine, VllmEngine)
    rows = [row for row in engine.prompt_logprobs(ids, TOP_K, VLLM_TIMEOUT_S)[len(ids) - n:] if row is not None]
    if len(rows) != n:
        raise RuntimeError(f"vLLM of v{slot.version} returned prompt logprobs for {len(rows)} of {n} positions")
    return rows

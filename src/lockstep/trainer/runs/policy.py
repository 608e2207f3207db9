"""The trainer's own copy of the model and its updates: policy gradient with a group baseline, or supervised
on the best answers.

Log-probabilities are those of the sampled completion tokens under the trainer's model. The prompt is encoded
exactly as the replica encodes it (``tokenizer(prompt)``); the completion uses the replica's token ids when it
returns them, else it is re-tokenized from the text. A byte-level BPE model may have sampled a segmentation
that re-tokenizing does not reproduce; those samples still count (the canonical segmentation of the same text
is a close surrogate) and the share of them is reported as ``retokenized_mismatch``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lockstep.core.settings import Settings
from lockstep.models import loader

log = logging.getLogger(__name__)

Algorithm = Literal["grpo", "reinforce", "sft_best"]
MICRO_BATCH = 16  # sequences per forward pass; bounds activation memory (logits are [B, T, vocab])
STD_EPS = 1e-4  # keeps a group whose rewards barely differ from blowing up its advantages


@dataclass
class Scored:
    """A rollout with its reward, as the update sees it."""

    prompt: str
    completion: str
    reward: float
    group: int
    version: int
    finish_reason: str | None = None
    completion_tokens: int | None = None
    token_ids: list[int] | None = None


@dataclass
class StepStats:
    """What one update did."""

    loss: float
    samples: int  # samples with a non-zero weight
    tokens: int
    grad_norm: float
    retokenized_mismatch: float  # share of samples whose re-tokenization differs from what was generated
    nll: float  # mean negative log-likelihood of the weighted samples' tokens (before the update)


def advantages(samples: list[Scored], algorithm: Algorithm) -> list[float]:
    """Per-sample weights: GRPO (group-normalized), REINFORCE (group mean baseline), or best-of-group SFT."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.group, []).append(i)
    out = [0.0] * len(samples)
    for members in groups.values():
        rewards = [samples[i].reward for i in members]
        mean = sum(rewards) / len(rewards)
        if algorithm == "sft_best":
            best = max(members, key=lambda i: samples[i].reward)
            if samples[best].reward > mean:  # only an answer better than its siblings is worth imitating
                out[best] = 1.0
            continue
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
        for i in members:
            centred = samples[i].reward - mean
            out[i] = centred / (std + STD_EPS) if algorithm == "grpo" else centred
    return out


class Policy:
    """A trainable causal LM, its tokenizer and optimizer (AdamW)."""

    def __init__(self, model: Any, tokenizer: Any, *, device: torch.device, learning_rate: float,
                 weight_decay: float = 0.0, max_grad_norm: float = 1.0) -> None:
        self.model = model.to(device=device, dtype=torch.float32)  # float32 training, whatever it loaded as
        self.model.train()
        self.tokenizer = tokenizer
        self.device = device
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=learning_rate,
                                           weight_decay=weight_decay)
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_id: int | None = int(eos) if eos is not None else None

    @classmethod
    def load(cls, ref: str, settings: Settings, store: Any, **hyper: Any) -> Policy:
        """Resolve and load ``ref`` (safetensors only, checked like a replica does) in float32 and wrap it."""
        # LOCKSTEP_DTYPE is the serving dtype (auto: bfloat16 on some CPUs): loading in it would round the weights
        # before float32 training, and a resumed checkpoint would no longer be the one saved.
        loaded = loader.load(loader.resolve(ref, settings, store), settings, dtype=torch.float32)
        return cls(loaded.model, loaded.tokenizer, device=loaded.device, **hyper)

    # ------------------------------------------------------------------ tokens
    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])  # as the replica's /generate encodes it

    def completion_ids(self, s: Scored) -> tuple[list[int], bool]:
        """Token ids of the completion and whether they match the count the replica generated."""
        if s.token_ids is not None:
            return list(s.token_ids), True
        ids = list(self.tokenizer(s.completion, add_special_tokens=False)["input_ids"])
        if s.finish_reason == "stop" and self.eos_id is not None:
            ids.append(self.eos_id)  # the model chose to stop: that choice is part of the sample
        return ids, s.completion_tokens is None or len(ids) == s.completion_tokens

    # ------------------------------------------------------------------ update
    def step(self, samples: list[Scored], algorithm: Algorithm) -> StepStats:
        """One optimizer step over ``samples``; samples with zero weight cost nothing."""
        weights = advantages(samples, algorithm)
        rows = []
        mismatched = 0
        for s, w in zip(samples, weights, strict=True):
            ids, matches = self.completion_ids(s)
            mismatched += not matches
            if w != 0.0 and ids:
                rows.append((self.prompt_ids(s.prompt), ids, w))
        share = mismatched / len(samples) if samples else 0.0
        if not rows:
            return StepStats(0.0, 0, 0, 0.0, share, 0.0)
        # Dividing by every sample (not only weighted ones) keeps the step size independent of how many
        # groups happened to have equal rewards.
        scale = 1.0 / (sum(1 for w in weights if w > 0) if algorithm == "sft_best" else len(samples))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = nll_sum = 0.0
        tokens = 0
        for start in range(0, len(rows), MICRO_BATCH):
            chunk = rows[start:start + MICRO_BATCH]
            mean_logps = self._mean_logprobs(chunk)
            chunk_weights = torch.tensor([c[2] for c in chunk], device=self.device)
            loss = -(chunk_weights * mean_logps).sum() * scale
            loss.backward()
            total_loss += float(loss.detach())
            nll_sum += float(-mean_logps.detach().sum())
            tokens += sum(len(c[1]) for c in chunk)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        return StepStats(total_loss, len(rows), tokens, float(grad_norm), share, nll_sum / len(rows))

    def _mean_logprobs(self, chunk: list[tuple[list[int], list[int], float]]) -> torch.Tensor:
        """Mean log-probability of each row's completion tokens given its prompt: shape [rows]."""
        limit = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        seqs = []
        for prompt, completion, _ in chunk:
            keep_prompt = max(1, min(len(prompt), limit - len(completion)))
            seqs.append((prompt[-keep_prompt:], completion[: limit - keep_prompt]))
        length = max(len(p) + len(c) for p, c in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        attention = torch.zeros((len(seqs), length), dtype=torch.long)
        target_mask = torch.zeros((len(seqs), length), dtype=torch.bool)
        for row, (p, c) in enumerate(seqs):
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            attention[row, : len(p) + len(c)] = 1
            target_mask[row, len(p): len(p) + len(c)] = True  # right padding: positions stay 0..n-1
        ids, attention = ids.to(self.device), attention.to(self.device)
        target_mask = target_mask.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        targets = ids[:, 1:]
        mask = target_mask[:, 1:]
        logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return (logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    # ------------------------------------------------------------------ saving
    def save_model(self, folder: Path) -> None:
        """An HF model folder: config, safetensors weights, tokenizer."""
        self.model.save_pretrained(folder, **loader.save_kwargs(self.model.save_pretrained))
        self.tokenizer.save_pretrained(folder)

    def optimizer_tensors(self) -> dict[str, torch.Tensor]:
        """AdamW's state by parameter name (``<param>::<key>``), for a safetensors file."""
        out: dict[str, torch.Tensor] = {}
        for name, param in self.model.named_parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                tensor = value if torch.is_tensor(value) else torch.tensor(value)
                out[f"{name}::{key}"] = tensor.detach().to("cpu").contiguous()
        return out

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for full, tensor in tensors.items():
            name, _, key = full.rpartition("::")
            param = params.get(name)
            if param is None:
                raise ValueError(f"optimizer state names parameter {name!r}, which this model does not have")
            state = self.optimizer.state[param]
            state[key] = tensor if key == "step" else tensor.to(param.device)

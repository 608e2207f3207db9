"""Model slots for the rollout tests: real built-in tiny models, loaded as a replica loads them."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch

from lockstep.engine import Engine, SamplingParams
from lockstep.inference.slot import FreedEngine, ModelSlot, ServingEngine
from lockstep.models import loader
from tests.inference.conftest import replica_settings

PROMPTS = ("Once upon a time", "The cat sat on", "One, two, three,", "Colours of the sky")
MAX_NEW = 8
GREEDY = SamplingParams(max_new_tokens=MAX_NEW)


def load(builtin_dir: Path, name: str) -> loader.LoadedModel:
    """``builtin:<name>`` in float32 on the CPU, through the replica's loader."""
    settings = replica_settings(builtin_dir)
    return loader.load(loader.resolve(f"builtin:{name}", settings), settings)


def perturbed(loaded: loader.LoadedModel, scale: float, seed: int = 0) -> loader.LoadedModel:
    """A copy whose every weight has Gaussian noise of ``scale`` times that tensor's own std added."""
    model = copy.deepcopy(loaded.model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (scale * float(p.std())))
    return dataclasses.replace(loaded, model=model, weights_digest=loader.weights_digest(model))


def engine(loaded: loader.LoadedModel) -> Engine:
    """A started built-in engine, small: two sequences of at most 256 tokens."""
    return Engine(loaded.model, loaded.tokenizer, max_batch_size=2, max_queue=8, max_context=256).start()


def slot(version: int, loaded: loader.LoadedModel, eng: ServingEngine | None = None) -> ModelSlot:
    """A slot holding ``loaded``; without an engine, one that refuses requests (compare() never submits)."""
    return ModelSlot(version=version, model_ref=f"versions/{version}", digest=None, loaded=loaded,
                     engine=eng if eng is not None else FreedEngine(version))


def encode(loaded: loader.LoadedModel | ModelSlot, text: str) -> list[int]:
    return list(loaded.tokenizer(text)["input_ids"])


def greedy_answer(model: Any, prompt: list[int], n: int = MAX_NEW) -> list[int]:
    """What greedy decoding writes after ``prompt``: the model's own forward pass over the whole text per token."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]

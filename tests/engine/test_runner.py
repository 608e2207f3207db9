"""make_runner picks the batched runner for Llama-family models and refuses impossible requests."""

from __future__ import annotations

import pytest
import transformers

from lockstep.core.errors import BadRequest
from lockstep.engine.hf_runner import HFRunner
from lockstep.engine.llama_runner import LlamaRunner
from lockstep.engine.runner import make_runner

from . import llama


def test_auto_prefers_the_batched_runner() -> None:
    model = llama()
    assert isinstance(make_runner(model, 2, 32), LlamaRunner)
    assert isinstance(make_runner(model, 2, 32, backend="hf"), HFRunner)


def test_llama_backend_on_another_architecture_is_refused() -> None:
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300)
    gpt2 = transformers.GPT2LMHeadModel(config)
    assert isinstance(make_runner(gpt2, 2, 32), HFRunner)
    with pytest.raises(BadRequest, match="Llama-family"):
        make_runner(gpt2, 2, 32, backend="llama")
    with pytest.raises(BadRequest, match="auto, llama, hf"):
        make_runner(gpt2, 2, 32, backend="vllm")

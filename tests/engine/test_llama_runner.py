"""LlamaRunner reproduces the HF model's logits: batched padded prefill, then batched decode steps."""

from __future__ import annotations

import pytest
import torch
import transformers

from lockstep.engine import llama_runner
from lockstep.engine.llama_runner import LlamaRunner

from . import config_kwargs, finish_model, llama

ATOL = 1e-4  # float32; observed differences are ~1e-7


def build(kind: str, **extra: object) -> torch.nn.Module:
    torch.manual_seed(1)
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    return finish_model(model_cls(cfg_cls(**{**config_kwargs(), "head_dim": 16, **extra})))


def hf_last_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_prefill_and_decode_match_hf_logits(kind: str) -> None:
    model = build(kind)
    assert llama_runner.supports(model, 128)
    prompts = [[5, 9, 200, 31, 7, 44, 12], [80, 3], [150, 151, 152, 153]]  # different lengths: padded prefill
    runner = LlamaRunner(model, max_batch_size=4, max_context=128)
    with torch.inference_mode():
        logits = runner.prefill(prompts, [0, 1, 2])
        seqs = [list(p) for p in prompts]
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(logits[row], hf_last_logits(model, seq), atol=ATOL, rtol=0)
        for _ in range(4):
            for row, seq in enumerate(seqs):
                seq.append(int(logits[row].argmax()))
            logits = runner.decode([s[-1] for s in seqs], [len(s) - 1 for s in seqs])
            for row, seq in enumerate(seqs):
                torch.testing.assert_close(logits[row], hf_last_logits(model, seq), atol=ATOL, rtol=0)


def test_single_prompt_and_scattered_slots_match() -> None:
    model = llama()
    runner = LlamaRunner(model, max_batch_size=4, max_context=64)
    with torch.inference_mode():
        alone = runner.prefill([[10, 11, 12]], [0])
        torch.testing.assert_close(alone[0], hf_last_logits(model, [10, 11, 12]), atol=ATOL, rtol=0)
        # Slots 1 and 3 (not adjacent) write per row; then move slot 3 into slot 0 and decode slots 0..1.
        runner.prefill([[20, 21], [30, 31, 32, 33]], [3, 1])
        runner.release(0, dirty=False)  # the first sequence leaves; slot 3's moves into its place
        runner.move(src=3, dst=0, length=2)
        logits = runner.decode([22, 34], [2, 4])
        torch.testing.assert_close(logits[0], hf_last_logits(model, [20, 21, 22]), atol=ATOL, rtol=0)
        torch.testing.assert_close(logits[1], hf_last_logits(model, [30, 31, 32, 33, 34]), atol=ATOL, rtol=0)


def test_picks_up_in_place_weight_updates() -> None:
    model = llama()
    runner = LlamaRunner(model, max_batch_size=1, max_context=32)
    with torch.inference_mode():
        before = runner.prefill([[1, 2, 3]], [0])
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    with torch.inference_mode():
        after = runner.prefill([[1, 2, 3]], [0])
        torch.testing.assert_close(after[0], hf_last_logits(model, [1, 2, 3]), atol=ATOL, rtol=0)
    assert not torch.allclose(before, after)


def test_supports_rejects_what_it_cannot_reproduce() -> None:
    assert not llama_runner.supports(build("mistral", sliding_window=16), max_context=64)
    assert llama_runner.supports(build("mistral", sliding_window=64), max_context=64)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=300)
    gpt2 = transformers.GPT2LMHeadModel(config)
    assert not llama_runner.supports(gpt2, max_context=64)


def test_kv_cache_is_preallocated_in_blocks() -> None:
    runner = LlamaRunner(llama(), max_batch_size=3, max_context=40)
    assert len(runner.cache.k) == 2
    # Every slot at the full context by default: 3 blocks of 16 positions each, and the null block.
    assert tuple(runner.cache.k[0].shape) == ((3 * 3 + 1) * 16, 2, 16)  # [positions, kv heads, head dim]
    assert runner.cache.nbytes == 2 * 2 * (3 * 3 + 1) * 16 * 2 * 16 * 4
    small = LlamaRunner(llama(), max_batch_size=3, max_context=40, kv_tokens=20)
    assert small.cache.num_blocks == 2


def test_sequences_share_a_cache_smaller_than_their_full_contexts() -> None:
    """Three sequences decode side by side in a cache that holds one full context: each has only its blocks."""
    model = llama()
    runner = LlamaRunner(model, max_batch_size=3, max_context=64, kv_tokens=64)
    prompts = [[5, 9, 200], [80, 3, 4, 6], [150, 151]]
    with torch.inference_mode():
        for slot, prompt in enumerate(prompts):
            assert runner.reserve(slot, len(prompt) + 12)  # one block each
        logits = runner.prefill(prompts, [0, 1, 2])
        seqs = [list(p) for p in prompts]
        for _ in range(12):
            for row, seq in enumerate(seqs):
                seq.append(int(logits[row].argmax()))
            logits = runner.decode([s[-1] for s in seqs], [len(s) - 1 for s in seqs])
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(logits[row], hf_last_logits(model, seq), atol=ATOL, rtol=0)
    assert runner.cache.free_blocks == 1
    with pytest.raises(RuntimeError, match="no free block"):
        with torch.inference_mode():
            runner.decode([1, 1, 1], [len(seqs[0]) + 32, 0, 0])  # two blocks past slot 0's: one is free


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_a_fused_step_decodes_and_prefills_in_one_pass_as_hf_does(kind: str) -> None:
    model = build(kind)
    runner = LlamaRunner(model, max_batch_size=5, max_context=64)
    passes: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: passes.append(1))
    running = [[5, 9, 200, 31], [80, 3]]
    arriving = [[150, 151, 152], [7], [40, 41, 42, 43, 44, 45]]
    try:
        with torch.inference_mode():
            logits = runner.prefill(running, [0, 1])
            for row, seq in enumerate(running):
                seq.append(int(logits[row].argmax()))
            passes.clear()
            logits = runner.step([s[-1] for s in running], [len(s) - 1 for s in running], arriving, [2, 3, 4])
            assert len(passes) == 1 and logits.shape[0] == 5
            for row, seq in enumerate(running + arriving):
                torch.testing.assert_close(logits[row], hf_last_logits(model, seq), atol=ATOL, rtol=0)
            # All five decode together next: the prompts' K/V went to their slots' blocks.
            seqs = [s + [int(logits[row].argmax())] for row, s in enumerate(running + arriving)]
            logits = runner.decode([s[-1] for s in seqs], [len(s) - 1 for s in seqs])
            for row, seq in enumerate(seqs):
                torch.testing.assert_close(logits[row], hf_last_logits(model, seq), atol=ATOL, rtol=0)
            runner.release(4, dirty=False)
            idle = runner.step([], [], [[3, 4, 5]], [4])  # no decode rows: prompts only
            torch.testing.assert_close(idle[0], hf_last_logits(model, [3, 4, 5]), atol=ATOL, rtol=0)
    finally:
        hook.remove()


def test_a_repeated_prompt_goes_through_the_model_once_and_every_copy_decodes_as_hf_does() -> None:
    model = llama()
    runner = LlamaRunner(model, max_batch_size=6, max_context=64)
    tokens_seen: list[int] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda module, args, out: tokens_seen.append(
        args[0].numel()))
    prompt, other = [10, 11, 12, 13], [20, 21]
    try:
        with torch.inference_mode():
            logits = runner.prefill([prompt, other, prompt, prompt], [0, 1, 2, 3])  # n = 3 for one prompt
            assert sum(tokens_seen) == 2 * len(prompt)  # padded to 4: each distinct prompt once
            for row, ids in enumerate([prompt, other, prompt, prompt]):
                torch.testing.assert_close(logits[row], hf_last_logits(model, ids), atol=ATOL, rtol=0)
            # Each copy continues with its own token from its own K/V.
            seqs = [prompt + [1], other + [2], prompt + [3], prompt + [4]]
            tokens_seen.clear()
            step = runner.step([s[-1] for s in seqs], [len(s) - 1 for s in seqs], [other, other], [4, 5])
            assert sum(tokens_seen) == len(seqs) + len(other)  # the fused step's prompt, once
            for row, ids in enumerate(seqs + [other, other]):
                torch.testing.assert_close(step[row], hf_last_logits(model, ids), atol=ATOL, rtol=0)
            seqs += [other + [5], other + [6]]
            logits = runner.decode([s[-1] for s in seqs], [len(s) - 1 for s in seqs])
            for row, ids in enumerate(seqs):
                torch.testing.assert_close(logits[row], hf_last_logits(model, ids), atol=ATOL, rtol=0)
    finally:
        hook.remove()

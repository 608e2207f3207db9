"""The generic path serves an architecture the batched runner does not know (GPT-2), like HF generate."""

from __future__ import annotations

import torch
import transformers

from lockstep.engine import Engine, SamplingParams

from . import encode, finish_model, hf_greedy, tokenizer


def test_gpt2_goes_through_the_generic_path_and_matches_generate() -> None:
    tok = tokenizer()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tok), n_positions=128,
                                     eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
    model = finish_model(transformers.GPT2LMHeadModel(config))
    engine = Engine(model, tok, max_batch_size=3).start()
    try:
        assert engine.backend == "hf" and engine.kv_cache_bytes == 0
        prompts = ["The quick brown fox", "Emoji 😀", "a", "Numbers: one two"]
        lengths = (9, 4, 12, 6)
        handles = [engine.submit(encode(p), SamplingParams(max_new_tokens=n))
                   for p, n in zip(prompts, lengths, strict=True)]
        for p, n, handle in zip(prompts, lengths, handles, strict=True):
            assert list(handle.result(60).token_ids) == hf_greedy(model, encode(p), n)
    finally:
        engine.close()

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


def test_decode_one_after_a_step_that_failed_half_way_through_the_layers_equals_a_clean_step() -> None:
    from lockstep.engine.hf_runner import HFRunner

    from . import llama

    model = llama(seed=1)
    prompt = encode("The quick brown fox")
    clean, torn = HFRunner(model, 2, 64), HFRunner(model, 2, 64)
    with torch.inference_mode():
        first = int(clean.prefill([prompt], [0])[0].argmax())
        torn.prefill([prompt], [0])
        expected = clean.decode([first], [len(prompt)])

        calls = {"n": 0}

        def fail_in_the_second_layer(module: object, args: object) -> None:
            calls["n"] += 1
            if calls["n"] == 2:  # layer 0 already appended this position to its cache; layer 1 has not
                raise RuntimeError("injected failure between layers")

        hooks = [layer.register_forward_pre_hook(fail_in_the_second_layer) for layer in model.model.layers]
        try:
            try:
                torn.decode([first], [len(prompt)])
            except RuntimeError:
                pass
            else:
                raise AssertionError("the injected failure did not happen")
        finally:
            for hook in hooks:
                hook.remove()
        cache = torn._caches[0]
        assert cache.get_seq_length() == len(prompt) + 1  # torn: layer 0 is a position ahead
        again = torn.decode_one(first, len(prompt), 0)
    torch.testing.assert_close(again, expected)
    assert cache.get_seq_length() == len(prompt) + 1

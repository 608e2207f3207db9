"""Engine tests. Shared builders: a byte-level BPE tokenizer and small seeded Llama-family models."""

from __future__ import annotations

import functools
from typing import Any

import torch

# Mixed scripts so multi-byte characters end up split across byte-level tokens.
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model writes a short story about a red fox and a blue bird.",
    "Numbers: one two three four five six seven eight nine ten.",
    "Café, naïve, résumé, jalapeño: accents are bytes too.",
    "Emoji 😀 and 🚀 and kanji 日本語 and Greek αβγ and Cyrillic жизнь.",
    "The engine streams tokens; the client reads them as they arrive.",
]
EOS, PAD = "<eos>", "<pad>"


@functools.cache
def tokenizer() -> Any:
    """A byte-level BPE tokenizer (vocab 300) trained on CORPUS, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)


def config_kwargs() -> dict[str, Any]:
    """Shape shared by every test model: hidden 64, 2 layers, 4 query heads over 2 KV heads (GQA)."""
    tok = tokenizer()
    return {
        "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id, "bos_token_id": None,
        "initializer_range": 0.2,  # larger than Llama's 0.02 so the output depends on the context
    }


def finish_model(model: Any) -> Any:
    """Eval mode, decisive logits (no argmax near-ties between batched/unbatched numerics), eos/pad set."""
    tok = tokenizer()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
        model.get_output_embeddings().weight.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = None
    return model.eval()


def llama(seed: int = 0) -> Any:
    """A seeded LlamaForCausalLM of the test shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return finish_model(LlamaForCausalLM(LlamaConfig(**config_kwargs())))


def encode(text: str) -> list[int]:
    return tokenizer()(text, add_special_tokens=False)["input_ids"]


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The reference: HF generate(do_sample=False) for one prompt; the new token ids (eos included)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, len(prompt):].tolist()

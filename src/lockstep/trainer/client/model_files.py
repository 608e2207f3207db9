"""Which files of a model folder get published: what a replica loads, never optimizer or RNG state."""

from __future__ import annotations

from pathlib import Path

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                    "chat_template.jinja", "chat_template.json")
_MODEL_FILES = ("config.json", "generation_config.json")


def model_files(folder: Path) -> list[str]:
    """The top-level files of ``folder`` a replica needs: config, safetensors weights, tokenizer."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    return [n for n in names if n in _MODEL_FILES or n in _TOKENIZER_FILES or n.endswith(".safetensors")
            or n.endswith(".safetensors.index.json")]

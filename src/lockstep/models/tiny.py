"""The built-in tiny/mid Llama-style models, built offline and deterministically from a seed.

A builtin model is a randomly initialised ``LlamaForCausalLM`` (no training) plus a byte-level BPE
tokenizer trained on the English text in ``corpus/``. The same ``(size, seed)`` gives byte-identical
``model.safetensors`` and ``tokenizer.json`` on every machine, so replicas that each build
``builtin:tiny-s1`` locally agree on its weight digest.

Why not ``torch.nn.init.normal_``: its CPU kernel is compiled per instruction set (AVX2, AVX-512, NEON)
with vectorised log/cos approximations, so the same seed can differ in the last bits across machines.
Weights here come from MT19937 integers (``torch.randint``, a serial integer kernel) mapped to a uniform
distribution with one correctly rounded float32 multiply, which is exact IEEE arithmetic everywhere.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock

from lockstep.core.atomic import fsync_dir
from lockstep.core.errors import BadModelRef, BadRequest, Conflict

if TYPE_CHECKING:  # transformers takes seconds to import: only where a model is built
    from transformers import LlamaConfig, PreTrainedTokenizerFast

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
# Order fixes the ids: bos=0, eos=1, pad=2, user=3, assistant=4, system=5.
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, USER, ASSISTANT, SYSTEM)

# Renders "<|bos|><|system|>\n...<|eos|>\n<|user|>\n...<|eos|>\n<|assistant|>\n". The tokenizer adds no
# special tokens on its own, so encoding the rendered text never doubles the bos token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Uniform init, scaled so that a random model behaves alike at every size (std = gain / sqrt(fan_in)).
# Input embeddings: std 0.3. q/k/v/gate/up: gain 0.32. o_proj/down_proj write into the residual stream:
# gain 0.9 / sqrt(2 * layers) (GPT-2's depth scaling), so all layers together add about as much as one
# token's embedding: greedy output then depends on the whole context yet does not collapse into one
# repeated token (layers swamping the embedding do that). lm_head: std LOGIT_STD / sqrt(hidden), so logits
# have std ~4: greedy has a clear winner, temperature 1 still varies, a zeroed row (logit 0) is not picked.
EMBEDDING_STD = 0.3
INPUT_GAIN = 0.32
OUTPUT_GAIN = 0.9
LOGIT_STD = 4.0
_OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight")

TOKENIZER_MIN_FREQUENCY = 2  # a merge must occur twice in the corpus: no tokens for one-off words
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_NAME_RE = re.compile(r"^(?P<size>[a-z]+)(?:-s(?P<seed>0|[1-9][0-9]{0,8}))?$")


@dataclass(frozen=True)
class SizeSpec:
    """Shape of one builtin size; ``params`` is the exact parameter count (checked by a test)."""

    description: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    params: int
    max_position_embeddings: int = 2048


# Vocabulary 2048 for both sizes, not 4096/8192: the ~54 KB corpus holds only ~2.1k byte-level BPE
# pieces seen at least twice (~3.5k counting one-off words), so a larger vocabulary cannot be trained
# from it. Sharing one tokenizer also lets tiny and mid stand in for each other anywhere text is handled.
SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(
        description="3.8 M parameters: 4 layers, hidden 256, 8 query / 2 KV heads; builds in about a second",
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2, params=3_819_776,
    ),
    "mid": SizeSpec(
        description="116 M parameters: 18 layers, hidden 768, 12 query / 4 KV heads; ~465 MB float32",
        vocab_size=2048, hidden_size=768, intermediate_size=2048, num_hidden_layers=18,
        num_attention_heads=12, num_key_value_heads=4, params=116_420_352,
    ),
}


def _spec(size: str) -> SizeSpec:
    try:
        return SIZES[size]
    except KeyError:
        raise BadRequest(f"unknown builtin model size {size!r}; allowed: {', '.join(SIZES)}") from None


def builtin_dirname(size: str, seed: int) -> str:
    """Folder name of a builtin model inside the builtin directory: ``<size>-s<seed>``."""
    return f"{size}-s{seed}"


def parse_builtin_name(name: str) -> tuple[str, int]:
    """``tiny`` → ("tiny", 0), ``mid-s3`` → ("mid", 3); a leading ``builtin:`` is accepted."""
    bare = name.removeprefix("builtin:")
    match = _NAME_RE.match(bare)
    if match is None or match["size"] not in SIZES:
        forms = ", ".join(f"{s}, {s}-sN" for s in SIZES)
        raise BadModelRef(
            f"{name!r} is not a builtin model name; allowed: {forms} (N a non-negative integer seed, "
            "optionally prefixed with 'builtin:')"
        )
    return match["size"], int(match["seed"] or 0)


def llama_config(size: str) -> LlamaConfig:
    """The ``LlamaConfig`` of a builtin size, with the special-token ids of the builtin tokenizer."""
    from transformers import LlamaConfig

    spec = _spec(size)
    return LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        dtype="float32",
    )


def count_parameters(size: str) -> int:
    """Parameters of a builtin size, counted on the meta device (no memory, no weights)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(size))
    return sum(p.numel() for p in model.parameters())


def corpus_text() -> str:
    """The shipped corpus: every ``corpus/*.txt`` in name order, joined by blank lines."""
    folder = resources.files("lockstep.models") / "corpus"
    names = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".txt"))
    return "\n\n".join((folder / n).read_text(encoding="utf-8").replace("\r\n", "\n") for n in names)


@lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=TOKENIZER_MIN_FREQUENCY,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in corpus_text().split("\n") if line.strip()]
    tokenizer.train_from_iterator(lines, trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise BadRequest(
            f"the corpus supports only {tokenizer.get_vocab_size()} tokens, not {vocab_size}: "
            "add text to lockstep/models/corpus or lower the vocabulary size"
        )
    return tokenizer.to_str()


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the corpus (deterministic), with the role tokens and chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        chat_template=CHAT_TEMPLATE,
        model_max_length=SIZES["tiny"].max_position_embeddings,
        padding_side="left",  # batched generation pads on the left
        clean_up_tokenization_spaces=False,
    )


def _tensor_seed(seed: int, name: str) -> int:
    # One generator per tensor, keyed by (seed, name): a tensor's values do not depend on the others.
    digest = hashlib.sha256(f"lockstep-builtin:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _uniform(shape: torch.Size, std: float, generator: torch.Generator) -> torch.Tensor:
    half = 1 << 23  # integers in [-2^23, 2^23) are exact in float32
    ints = torch.randint(-half, half, tuple(shape), generator=generator, dtype=torch.int32)
    bound = std * 3.0**0.5  # uniform on [-b, b] has std b/sqrt(3)
    return ints.to(torch.float32) * torch.tensor(bound / half, dtype=torch.float32)


def silent_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids a random model must not write: special tokens and pieces with characters not in the corpus.

    Without this a random model emits raw control bytes and broken UTF-8 (the byte-level alphabet has
    all 256 bytes); their lm_head rows are zero instead. It also never writes eos: a reply runs to
    ``max_new_tokens``.
    """
    allowed = set(corpus_text())
    backend = tokenizer.backend_tokenizer
    silent = []
    for token_id in range(backend.get_vocab_size()):
        text = backend.decode([token_id], skip_special_tokens=True)
        if not text or not set(text) <= allowed:
            silent.append(token_id)
    return silent


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, silent_ids: list[int]) -> None:
    """Fill every parameter from ``seed`` in a way that is bit-identical on every CPU."""
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        if param.dim() != 2:
            raise BadRequest(f"builtin init has no rule for parameter {name} of shape {tuple(param.shape)}")
        if name == "model.embed_tokens.weight":
            std = EMBEDDING_STD
        elif name == "lm_head.weight":
            std = LOGIT_STD / hidden**0.5
        elif name.endswith(_OUTPUT_PROJECTIONS):
            std = OUTPUT_GAIN / (param.shape[1] * 2 * layers) ** 0.5
        else:
            std = INPUT_GAIN / param.shape[1] ** 0.5
        generator = torch.Generator(device="cpu").manual_seed(_tensor_seed(seed, name))
        param.copy_(_uniform(param.shape, std, generator))
    model.get_output_embeddings().weight[silent_ids] = 0.0


def _seal_tree(folder: Path) -> None:
    # World-readable (safetensors are written 0600): replicas of another uid share this folder.
    for path in sorted(folder.iterdir()):
        if path.is_file():
            os.chmod(path, 0o644)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    os.chmod(folder, 0o755)
    fsync_dir(folder)


def _save_kwargs(method: object) -> dict[str, bool]:
    # transformers 4.x needs safe_serialization=True; 5.x only writes safetensors and has no such flag.
    flags = inspect.signature(method).parameters
    return {"safe_serialization": True} if "safe_serialization" in flags else {}


def _write_model(tmp: Path, size: str, seed: int) -> None:
    from transformers import GenerationConfig, LlamaForCausalLM

    spec, name = _spec(size), builtin_dirname(size, seed)
    log.info("builtin %s: training the tokenizer (vocabulary %d)", name, spec.vocab_size)
    tokenizer = train_tokenizer(spec.vocab_size)
    config = llama_config(size)
    log.info("builtin %s: initialising %d parameters", name, spec.params)
    # The default init draws from the global RNG: seed it, and give the caller (a replica that samples)
    # its RNG state back untouched. init_weights then overwrites every parameter on its own generators.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    init_weights(model, seed, silent_token_ids(tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    log.info("builtin %s: writing safetensors to %s", name, tmp)
    model.save_pretrained(tmp, **_save_kwargs(model.save_pretrained))
    tokenizer.save_pretrained(tmp)
    meta = {"name": name, "size": size, "seed": seed, **asdict(spec)}
    (tmp / "lockstep_builtin.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    pickles = sorted(p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
    if pickles:
        raise BadRequest(f"builtin build wrote pickle files {pickles}; only safetensors are allowed")
    _seal_tree(tmp)


def build_tiny_model(out_dir: Path, *, seed: int = 0, size: str = "tiny", overwrite: bool = False) -> Path:
    """Build the builtin ``size`` model for ``seed`` into ``out_dir`` and return it.

    The files are written to a temporary sibling folder and renamed into place, so a reader sees no
    model or a whole one. A non-empty ``out_dir`` is refused unless ``overwrite`` is set.
    """
    _spec(size)
    if seed < 0:
        raise BadRequest(f"seed must be a non-negative integer, not {seed}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise Conflict(f"{out_dir} exists and is not a directory; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise Conflict(f"{out_dir} is not empty; pass overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        _write_model(tmp, size, seed)
        if out_dir.is_dir() and any(out_dir.iterdir()):
            # Move the old model aside first: rename() only replaces an empty directory.
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex}"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)  # an empty out_dir is replaced atomically
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("builtin %s: ready at %s", builtin_dirname(size, seed), out_dir)
    return out_dir


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _MODEL_FILES)


def ensure_builtin(name: str, builtin_dir: Path) -> Path:
    """Return ``builtin_dir/<size>-s<seed>``, building it first if missing (once across processes)."""
    size, seed = parse_builtin_name(name)
    builtin_dir = Path(builtin_dir)
    target = builtin_dir / builtin_dirname(size, seed)
    if _is_complete(target):
        return target  # it appears by rename, so whole once visible; no lock needed
    builtin_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(builtin_dir / f".{target.name}.lock")):
        if _is_complete(target):
            return target  # another process built it while we waited
        # Leftovers of a build that crashed: builds of this name in this folder run under this lock.
        for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
            for stale in builtin_dir.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)
        return build_tiny_model(target, seed=seed, size=size, overwrite=True)

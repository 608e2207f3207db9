"""The built-in models: deterministic bytes, distinct seeds, safe files, loadable, built once."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lockstep.core.errors import BadModelRef, BadRequest, Conflict
from lockstep.models.tiny import (
    SIZES,
    SPECIAL_TOKENS,
    build_tiny_model,
    corpus_text,
    count_parameters,
    ensure_builtin,
    parse_builtin_name,
)

PROMPTS = ["Hello", "The cat", "2 plus 3 is", "Once upon a time", "What colour is the sky?", "Count to ten:"]

# sha256 of tiny-s0's tensors (names, shapes, float32 bytes). Every machine must produce exactly this:
# replicas compare weight digests of builtins they each built. Change it only when the init is changed
# on purpose, and know that every cluster's builtin models change with it.
TINY_S0_TENSOR_DIGEST = "1eec77a8f48e3a32b5ebb0b4d9dceed69e3f230d75d6797908f0ceab9cb34183"


def tensor_digest(folder: Path) -> str:
    tensors = load_file(folder / "model.safetensors")
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # On a busy 2-core machine, torch's OpenMP threads wait on each other: one thread is ~20x faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def built(tiny_dirs: dict[int, Path]) -> dict[int, Path]:
    """tiny-s0 and tiny-s1, built once per session by ``ensure_builtin`` (tests/conftest.py)."""
    return tiny_dirs


@pytest.fixture(scope="module")
def models(tiny_dirs: dict[int, Path]) -> dict[int, torch.nn.Module]:
    return {seed: AutoModelForCausalLM.from_pretrained(tiny_dirs[seed]) for seed in (0, 1)}


def greedy(model: torch.nn.Module, tokenizer, prompt: str, n: int = 20) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return out[0, ids.input_ids.shape[1]:].tolist()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("tiny", ("tiny", 0)), ("tiny-s3", ("tiny", 3)), ("mid", ("mid", 0)), ("mid-s1", ("mid", 1)),
     ("tiny-s0", ("tiny", 0)), ("builtin:tiny-s12", ("tiny", 12))],
)
def test_parse_builtin_name_accepts_the_documented_forms(name: str, expected: tuple[str, int]) -> None:
    assert parse_builtin_name(name) == expected


@pytest.mark.parametrize(
    "name", ["", "huge", "Tiny", "tiny-s", "tiny-3", "tiny-s-1", "tiny-s01", "tiny-sx", " tiny", "tiny-s1 ",
             "mid-s1-s2", "builtin:", "tiny/../mid", "tiny-s10000000000"],
)
def test_parse_builtin_name_rejects_anything_else(name: str) -> None:
    with pytest.raises(BadModelRef) as info:
        parse_builtin_name(name)
    assert "tiny-sN" in str(info.value) and "mid" in str(info.value)


def test_same_seed_gives_identical_files(built: dict[int, Path], tmp_path: Path) -> None:
    torch.manual_seed(1234)
    torch.rand(1000)  # the global RNG state must not leak into the weights...
    state = torch.get_rng_state()
    again = build_tiny_model(tmp_path / "again", seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # ...nor the build into the caller's RNG
    names = sorted(p.name for p in built[0].iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (again / name).read_bytes() == (built[0] / name).read_bytes(), name


def test_weights_match_the_golden_digest(built: dict[int, Path]) -> None:
    assert tensor_digest(built[0]) == TINY_S0_TENSOR_DIGEST


def test_saved_folder_is_safetensors_only_and_loads(built: dict[int, Path]) -> None:
    folder = built[0]
    assert not [p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert (folder / "model.safetensors").stat().st_mode & 0o044 == 0o044  # readable by other replicas
    assert not list(folder.parent.glob(".*tmp-*"))  # the temporary folder was renamed, not left behind
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert next(model.parameters()).dtype == torch.float32
    config = model.config
    assert config.vocab_size == len(tokenizer) == SIZES["tiny"].vocab_size
    assert not config.tie_word_embeddings
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3, 4, 5]
    text = "Two plus three is five."
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # byte-level BPE round-trips, adds no bos


def test_chat_template_renders_roles_and_generation_prompt(built: dict[int, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built[0])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nHi<|eos|>\n<|assistant|>\n"
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert no_prompt == text.removesuffix("<|assistant|>\n")
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids
    with pytest.raises(Exception, match="role must be"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_different_seeds_give_different_greedy_output(built: dict[int, Path], models) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built[0])
    for prompt in PROMPTS[:3]:
        a, b = greedy(models[0], tokenizer, prompt), greedy(models[1], tokenizer, prompt)
        assert len(a) == len(b) == 20, (prompt, a, b)
        assert sum(x != y for x, y in zip(a, b, strict=True)) >= 15, (prompt, a, b)


def test_greedy_output_varies_and_is_plain_corpus_text(built: dict[int, Path], models) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built[0])
    allowed = set(corpus_text())
    outputs = [greedy(models[0], tokenizer, prompt) for prompt in PROMPTS]
    for prompt, ids in zip(PROMPTS, outputs, strict=True):
        assert len(set(ids)) >= 8, (prompt, ids)  # not one token, nor a short loop
        assert set(tokenizer.decode(ids)) <= allowed, prompt  # no control bytes, no broken UTF-8
        assert tokenizer.eos_token_id not in ids
    assert len({tuple(ids) for ids in outputs}) == len(PROMPTS)  # the context matters


def test_parameter_counts() -> None:
    for size, spec in SIZES.items():
        assert count_parameters(size) == spec.params, size
    assert 1_000_000 <= SIZES["tiny"].params <= 10_000_000
    assert 100_000_000 <= SIZES["mid"].params <= 150_000_000


def test_unknown_size_and_occupied_folder_are_refused(built: dict[int, Path], tmp_path: Path) -> None:
    with pytest.raises(BadRequest, match="allowed: tiny, mid"):
        build_tiny_model(tmp_path / "x", size="huge")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(Conflict, match="overwrite"):
        build_tiny_model(occupied, seed=1)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"]
    build_tiny_model(occupied, seed=1, overwrite=True)
    assert not (occupied / "notes.txt").exists()
    assert (occupied / "model.safetensors").read_bytes() == (built[1] / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]  # no temporary or old folders left


def _ensure_in_child(builtin_dir: str, barrier, results) -> None:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("lockstep.models.tiny")
    logger.addHandler(Collect())
    logger.setLevel(logging.INFO)
    torch.set_num_threads(1)
    barrier.wait(timeout=120)  # both processes have imported everything: start the race together
    path = ensure_builtin("tiny-s0", Path(builtin_dir))
    results.put((str(path), any("ready at" in m for m in records)))


def test_ensure_builtin_builds_once_across_processes(built: dict[int, Path], tmp_path: Path) -> None:
    builtin_dir = tmp_path / "builtin"
    builtin_dir.mkdir()
    (builtin_dir / ".tiny-s0.tmp-crashed").mkdir()  # left by a build that was killed
    ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (str(builtin_dir), barrier, results)
    procs = [ctx.Process(target=_ensure_in_child, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    target = builtin_dir / "tiny-s0"
    assert {path for path, _ in outcomes} == {str(target)}
    assert sorted(did_build for _, did_build in outcomes) == [False, True]
    # Built in other processes, byte-identical to the one built in this one.
    assert (target / "model.safetensors").read_bytes() == (built[0] / "model.safetensors").read_bytes()
    assert (target / "tokenizer.json").read_bytes() == (built[0] / "tokenizer.json").read_bytes()
    assert sorted(p.name for p in builtin_dir.iterdir()) == [".tiny-s0.lock", "tiny-s0"]
    before = (target / "model.safetensors").stat().st_ino
    assert ensure_builtin("builtin:tiny", builtin_dir) == target  # found, not rebuilt
    assert (target / "model.safetensors").stat().st_ino == before

"""Resolving references to files (built-ins, folders, an offline Hugging Face cache) and loading them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from lockstep.core.errors import BadModelRef, LoadError, NotFound, UnsafeModel, VerificationError
from lockstep.core.settings import Settings
from lockstep.models import loader

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the snapshot a cached repo's refs/main points at


def settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "hf_hub_offline": True,
        "device": "cpu",
        "dtype": "float32",  # auto depends on the CPU (bfloat16 with AMX-BF16 or AVX512-BF16); tests below inject it
        "shared_dir": None,
        "allow_pickle": False,
        "trust_remote_code": False,
    }
    return Settings(**{**base, **overrides})


def hub_cache(root: Path, repo_id: str, files_from: Path, commit: str = COMMIT) -> Path:
    """A Hugging Face cache holding ``repo_id`` at ``commit`` as the hub lays it out; returns HF_HOME."""
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in files_from.iterdir():
        if f.is_file():
            shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


def copy_model(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


# ------------------------------------------------------------------------------------------------ resolve
def test_builtin_resolves_into_the_builtin_dir(builtin_dir: Path) -> None:
    resolved = loader.resolve("builtin:tiny-s1", settings(builtin_dir=builtin_dir))
    assert resolved.path == builtin_dir / "tiny-s1" and (resolved.path / "model.safetensors").is_file()
    assert resolved.content_digest is None and resolved.version is None


def test_directory_resolves_to_itself(tiny_dirs: dict[int, Path]) -> None:
    resolved = loader.resolve(str(tiny_dirs[2]), settings())
    assert resolved.path == tiny_dirs[2].resolve()


def test_repo_id_from_an_offline_cache(tmp_path: Path, tiny_dirs: dict[int, Path]) -> None:
    s = settings(hf_home=hub_cache(tmp_path, "org/tiny", tiny_dirs[1]))
    resolved = loader.resolve("org/tiny", s)
    assert resolved.path == tmp_path / "hub" / "models--org--tiny" / "snapshots" / COMMIT
    assert resolved.revision == COMMIT  # the commit the reference resolved to, recorded with the version
    pinned = loader.resolve(f"org/tiny@{COMMIT}", s)
    assert pinned.path == resolved.path
    from_cache = loader.load(resolved, s)
    direct = loader.load(loader.resolve(str(tiny_dirs[1]), s), s)
    assert from_cache.weights_digest == direct.weights_digest


@pytest.mark.parametrize("ref", ["org/absent", f"org/tiny@{'f' * 40}"])
def test_offline_miss_is_a_clear_not_found(tmp_path: Path, tiny_dirs: dict[int, Path], ref: str) -> None:
    s = settings(hf_home=hub_cache(tmp_path, "org/tiny", tiny_dirs[1]))
    with pytest.raises(NotFound) as err:
        loader.resolve(ref, s)
    message = str(err.value)
    assert ref in message and "offline" in message and str(tmp_path / "hub") in message


def test_a_hub_that_cannot_be_reached_is_not_called_offline_mode(tmp_path: Path, tiny_dirs: dict[int, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub raises the same error offline and when the Hub is unreachable: the message says which."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(**_: Any) -> str:
        raise LocalEntryNotFoundError("cannot reach the Hub and nothing is cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    s = settings(hf_home=hub_cache(tmp_path, "org/tiny", tiny_dirs[1]), hf_hub_offline=False)
    with pytest.raises(NotFound) as err:
        loader.resolve("org/absent", s)
    assert "could not be reached" in str(err.value) and "offline mode" not in str(err.value)


def test_published_version_needs_a_store() -> None:
    with pytest.raises(BadModelRef, match="no shared folder"):
        loader.resolve("versions/1", settings())


# ------------------------------------------------------------------------------------------------ safety
def test_pickle_only_folder_is_refused_unless_opted_in(tmp_path: Path, tiny_dirs: dict[int, Path]) -> None:
    folder = copy_model(tiny_dirs[0], tmp_path / "pickled")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UnsafeModel) as err:
        loader.check_safe_files(folder, settings())
    assert "pytorch_model.bin" in str(err.value) and "LOCKSTEP_ALLOW_PICKLE" in str(err.value)
    loader.check_safe_files(folder, settings(allow_pickle=True))


def test_training_args_beside_safetensors_is_fine(tmp_path: Path, tiny_dirs: dict[int, Path]) -> None:
    folder = copy_model(tiny_dirs[0], tmp_path / "m")
    (folder / "training_args.bin").write_bytes(b"\x80\x04")
    loader.check_safe_files(folder, settings())


def test_remote_code_is_refused_unless_opted_in(tmp_path: Path, tiny_dirs: dict[int, Path]) -> None:
    folder = copy_model(tiny_dirs[0], tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeModel, match="LOCKSTEP_TRUST_REMOTE_CODE"):
        loader.check_safe_files(folder, settings())
    loader.check_safe_files(folder, settings(trust_remote_code=True))


@pytest.mark.parametrize(
    ("damage", "says"),
    [("weights", "no model weights"), ("config", "no config.json"), ("json", "not valid JSON")],
)
def test_not_a_model_folder(tmp_path: Path, tiny_dirs: dict[int, Path], damage: str, says: str) -> None:
    folder = copy_model(tiny_dirs[0], tmp_path / "m")
    if damage == "weights":
        (folder / "model.safetensors").unlink()
    elif damage == "config":
        (folder / "config.json").unlink()
    else:
        (folder / "config.json").write_text("{not json")
    with pytest.raises(BadModelRef, match=says):
        loader.check_safe_files(folder, settings())


# ------------------------------------------------------------------------------------------------ load
def test_device_and_dtype_auto_on_this_machine() -> None:
    if torch.cuda.is_available():
        pytest.skip("auto picks CUDA here")
    assert loader.pick_device("auto") == torch.device("cpu")
    expected = torch.bfloat16 if loader.cpu_has_native_bf16() else torch.float32
    assert loader.pick_dtype("auto", torch.device("cpu")) is expected


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    """A /proc/cpuinfo of two x86 CPUs with these flags."""
    cpu = ("processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU\n"
           "flags\t\t: fpu sse2 avx avx2 {flags}\nbugs\t\t: spectre_v1\n\n")
    path = tmp_path / "cpuinfo"
    path.write_text("".join(cpu.format(n=n, flags=flags) for n in range(2)))
    return path


@pytest.mark.parametrize(("flags", "native"), [
    ("avx512f avx512bw avx512_bf16", True),  # Cooper Lake, Zen 4
    ("avx512f amx_tile amx_bf16 amx_int8", True),  # Sapphire Rapids
    ("avx512f avx512bw avx512_vnni", False),  # AVX-512 without bf16: bf16 is emulated
    ("", False),  # AVX2 only (this project's test machines)
    ("avx512_bf16x", False),  # flags are whole words
])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, flags: str, native: bool) -> None:
    assert loader.cpu_has_native_bf16(cpuinfo(tmp_path, flags)) is native


def test_no_cpuinfo_or_no_flags_line_means_no_native_bf16(tmp_path: Path) -> None:
    assert loader.cpu_flags(tmp_path / "absent") == frozenset()
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n")
    assert not loader.cpu_has_native_bf16(arm)
    assert not loader.cpu_has_native_bf16(tmp_path)  # a folder, not a file: unreadable as one


def test_auto_on_a_cpu_is_bfloat16_only_with_native_bf16() -> None:
    cpu = torch.device("cpu")
    assert loader.pick_dtype("auto", cpu, cpu_native_bf16=lambda: True) is torch.bfloat16
    assert loader.pick_dtype("auto", cpu, cpu_native_bf16=lambda: False) is torch.float32
    for name, dtype in (("float32", torch.float32), ("float16", torch.float16)):
        assert loader.pick_dtype(name, cpu, cpu_native_bf16=lambda: True) is dtype  # a named dtype wins


def test_auto_on_cuda_ignores_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def never() -> bool:
        raise AssertionError("the CPU's features were consulted for a CUDA device")

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert loader.pick_dtype("auto", cuda, cpu_native_bf16=never) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert loader.pick_dtype("auto", cuda, cpu_native_bf16=never) is torch.float16


@pytest.mark.parametrize(
    ("name", "dtype"), [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)]
)
def test_dtype_override(name: str, dtype: torch.dtype) -> None:
    assert loader.pick_dtype(name, torch.device("cpu")) is dtype


def test_bad_device_and_dtype_say_what_is_allowed() -> None:
    with pytest.raises(BadModelRef, match="LOCKSTEP_DEVICE='gpu9'.*auto, cpu, cuda"):
        loader.pick_device("gpu9")
    with pytest.raises(BadModelRef, match="LOCKSTEP_DTYPE='int8'.*bfloat16"):
        loader.pick_dtype("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(LoadError, match="no CUDA device"):
            loader.pick_device("cuda:0")


def test_load_has_no_meta_tensors_and_a_stable_digest(tiny_dirs: dict[int, Path]) -> None:
    s = settings()
    first = loader.load(loader.resolve(str(tiny_dirs[0]), s), s)
    tensors = list(first.model.parameters()) + list(first.model.buffers())
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    assert first.device == torch.device("cpu") and first.dtype is torch.float32
    assert first.num_parameters == sum(p.numel() for p in first.model.parameters())
    assert first.max_context == first.model.config.max_position_embeddings
    assert not first.model.training
    again = loader.load(loader.resolve(str(tiny_dirs[0]), s), s)
    assert first.weights_digest == again.weights_digest == loader.weights_digest(again.model)
    other = loader.load(loader.resolve(str(tiny_dirs[1]), s), s)
    assert other.weights_digest != first.weights_digest
    loader.verify_weights(again, first.weights_digest)
    with pytest.raises(VerificationError, match=first.weights_digest[:12]):
        loader.verify_weights(other, first.weights_digest)


def test_dtype_override_is_applied_and_changes_the_digest(tiny_dirs: dict[int, Path]) -> None:
    full = loader.load(loader.resolve(str(tiny_dirs[0]), settings()), settings())
    s = settings(dtype="bfloat16")
    half = loader.load(loader.resolve(str(tiny_dirs[0]), s), s)
    assert half.dtype is torch.bfloat16
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert half.weights_digest != full.weights_digest


def test_a_dtype_passed_to_load_wins_over_the_setting(tiny_dirs: dict[int, Path]) -> None:
    s = settings(dtype="bfloat16")
    loaded = loader.load(loader.resolve(str(tiny_dirs[0]), s), s, dtype=torch.float32)
    assert loaded.dtype is torch.float32 and {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    on_disk = load_file(str(tiny_dirs[0] / "model.safetensors"))
    name, tensor = next(iter(sorted(on_disk.items())))
    assert not torch.equal(tensor.to(torch.bfloat16).float(), tensor)  # bfloat16 would round these
    assert torch.equal(loaded.model.state_dict()[name], tensor)


def test_digest_covers_names_dtypes_shapes_and_bytes() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    base = loader.digest_named_tensors([("a", t)])
    assert base == loader.digest_named_tensors([("a", t.clone())])
    for changed in ([("b", t)], [("a", t.to(torch.float64))], [("a", t.reshape(3, 2))], [("a", t + 1)]):
        assert loader.digest_named_tensors(changed) != base


def test_checkpoint_missing_a_tensor_is_refused(tmp_path: Path, tiny_dirs: dict[int, Path]) -> None:
    folder = copy_model(tiny_dirs[0], tmp_path / "partial")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    s = settings()
    with pytest.raises(LoadError, match="model.layers.1.mlp.up_proj.weight"):
        loader.load(loader.resolve(str(folder), s), s)


def test_corrupt_safetensors_is_a_load_error(tmp_path: Path, tiny_dirs: dict[int, Path]) -> None:
    folder = copy_model(tiny_dirs[0], tmp_path / "corrupt")
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 16)
    s = settings()
    with pytest.raises(LoadError, match="could not load"):
        loader.load(loader.resolve(str(folder), s), s)


def test_a_folder_with_unreadable_parts_is_a_bad_reference_not_a_crash(tmp_path: Path) -> None:
    # /proc holds entries not even root may list; a reference to it used to escape as a PermissionError (500).
    with pytest.raises(BadModelRef, match="cannot read|can read"):
        loader.check_safe_files(Path("/proc"), settings())


def test_a_huge_folder_is_refused_without_walking_all_of_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "MAX_MODEL_FOLDER_ENTRIES", 50)
    for i in range(10):
        (tmp_path / f"d{i}").mkdir()
        for j in range(10):
            (tmp_path / f"d{i}" / f"f{j}.txt").write_text("x")
    walked: list[str] = []
    real_walk = loader.os.walk

    def counting_walk(*args: Any, **kwargs: Any) -> Any:
        for step in real_walk(*args, **kwargs):
            walked.append(step[0])
            yield step

    monkeypatch.setattr(loader.os, "walk", counting_walk)
    with pytest.raises(BadModelRef, match="more than 50"):
        loader.check_safe_files(tmp_path, settings())
    assert len(walked) < 11, "the walk went on after the bound"


def test_a_config_naming_far_more_layers_than_the_files_hold_is_refused_before_allocating(
        tmp_path: Path, tiny_dirs: dict[int, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers allocates (and fills at random) every weight the config names: 2,000 layers beside a 2-layer
    checkpoint took gigabytes before the load found them missing. It must be refused before from_pretrained."""
    from transformers import AutoModelForCausalLM

    folder = copy_model(tiny_dirs[0], tmp_path / "absurd")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 2000
    (folder / "config.json").write_text(json.dumps(config))

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("from_pretrained was called: the weights would be allocated")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", never)
    s = settings()
    with pytest.raises(LoadError, match="describes a model of") as err:
        loader.load(loader.resolve(str(folder), s), s)
    assert "are not in the files, e.g. model.layers." in str(err.value), "the message names a weight the files lack"

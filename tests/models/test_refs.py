"""Model references: each allowed form parses to its kind; malformed or escaping ones are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from lockstep.core.errors import BadModelRef
from lockstep.models.refs import ALLOWED_FORMS, ModelRef, RefKind, parse_ref


@pytest.mark.parametrize(
    ("raw", "builtin"),
    [
        ("builtin:tiny", "tiny-s0"),
        ("builtin:tiny-s1", "tiny-s1"),
        ("builtin:mid", "mid-s0"),
        ("builtin:mid-s42", "mid-s42"),
    ],
)
def test_builtin(raw: str, builtin: str) -> None:
    ref = parse_ref(raw)
    assert (ref.kind, ref.builtin, ref.raw, str(ref)) == (RefKind.BUILTIN, builtin, raw, raw)


@pytest.mark.parametrize(
    ("raw", "repo", "revision"),
    [
        ("org/name", "org/name", None),
        ("gpt2", "gpt2", None),
        ("Org_1/Name.v2-x", "Org_1/Name.v2-x", None),
        ("org/name@main", "org/name", "main"),
        ("org/name@" + "a" * 40, "org/name", "a" * 40),
        ("org/name@refs/pr/1", "org/name", "refs/pr/1"),
        ("  org/name  ", "org/name", None),
    ],
)
def test_repo_id(raw: str, repo: str, revision: str | None) -> None:
    ref = parse_ref(raw)
    assert (ref.kind, ref.repo_id, ref.revision) == (RefKind.REPO, repo, revision)


@pytest.mark.parametrize(("raw", "version"), [("versions/7", 7), ("versions/000012", 12), ("versions/3/", 3)])
def test_published_version(raw: str, version: int) -> None:
    ref = parse_ref(raw)
    assert (ref.kind, ref.version) == (RefKind.VERSION, version)


def test_directory_absolute_and_dot_slash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model").mkdir()
    assert parse_ref(str(tmp_path / "model")) == ModelRef(
        raw=str(tmp_path / "model"), kind=RefKind.DIRECTORY, path=(tmp_path / "model").resolve()
    )
    monkeypatch.chdir(tmp_path)
    ref = parse_ref("./model")
    assert ref.kind is RefKind.DIRECTORY and ref.path == (tmp_path / "model").resolve()


def test_directories_can_be_disallowed(tmp_path: Path) -> None:
    with pytest.raises(BadModelRef, match="local paths are not allowed"):
        parse_ref(str(tmp_path), allow_directories=False)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("", "empty model reference"),
        ("   ", "empty model reference"),
        ("x" * 1025, "too long"),
        ("org/na\x00me", "malformed"),
        ("builtin:huge", "unknown built-in model"),
        ("builtin:tiny-sX", "unknown built-in model"),
        ("versions/../../etc", "versions/N"),
        ("versions/abc", "versions/N"),
        ("versions/1/../2", "versions/N"),
        ("versions\\..\\x", "versions/N"),
        ("../x", "'..' is not allowed"),
        ("./a/../../b", "'..' is not allowed"),
        ("/nonexistent/lockstep/model", "does not exist"),
        ("org/../name", "not a valid model reference"),
        ("org/a--b", "not a valid model reference"),
        ("a/b/c", "not a valid model reference"),
        ("has space", "not a valid model reference"),
        ("-leading", "not a valid model reference"),
        ("org/" + "n" * 97, "not a valid model reference"),
        ("org/name@bad rev", "revision"),
        ("org/name@" + "r" * 129, "revision"),
    ],
)
def test_refusals_say_what_is_wrong(raw: str, says: str) -> None:
    with pytest.raises(BadModelRef) as err:
        parse_ref(raw)
    assert says in str(err.value)
    assert err.value.status_code == 400


def test_a_malformed_reference_lists_the_allowed_forms() -> None:
    with pytest.raises(BadModelRef) as err:
        parse_ref("not a model")
    assert ALLOWED_FORMS in str(err.value)


def test_a_file_is_not_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(BadModelRef, match="not a directory"):
        parse_ref(str(tmp_path / "weights.safetensors"))


def test_a_home_folder_of_nobody_is_a_400_not_a_crash() -> None:
    with pytest.raises(BadModelRef, match="home folder") as err:
        parse_ref("~nosuchuser-lockstep/x")
    assert err.value.status_code == 400

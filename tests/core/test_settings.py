"""Settings: read from the environment with the seed's names, validated, documented in one place."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from lockstep.core.settings import CommitPolicy, Settings, UpdateMode, reference_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_seed_names_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INITIAL_MODEL_REPO_ID", "org/model")
    monkeypatch.setenv("SYNC_STATE_FILE", str(tmp_path / "s.json"))
    monkeypatch.setenv("LOCKSTEP_SHARED_DIR", str(tmp_path))
    monkeypatch.setenv("LOCKSTEP_UPDATE_MODE", "inplace")
    monkeypatch.setenv("LOCKSTEP_COMMIT_POLICY", "quorum")
    monkeypatch.setenv("INFERENCE_URLS", "http://a:8000/, http://b:8000")
    s = Settings()
    assert s.initial_model_repo_id == "org/model"
    assert s.sync_state_path == tmp_path / "s.json"
    assert s.hf_home_path == tmp_path / "hf_home"
    assert s.update_mode is UpdateMode.INPLACE and s.commit_policy is CommitPolicy.QUORUM
    assert s.inference_url_list == ["http://a:8000", "http://b:8000"]


def test_defaults_without_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("INITIAL_MODEL_REPO_ID", "LOCKSTEP_SHARED_DIR", "SYNC_STATE_FILE"):
        monkeypatch.delenv(name, raising=False)
    s = Settings()
    assert s.initial_model_repo_id == "builtin:tiny"
    assert s.shared_dir is None and s.sync_state_path is None
    assert s.poll_interval_s == 0.1


def test_bad_values_name_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKSTEP_POLL_INTERVAL_S", "-1")
    with pytest.raises(ValidationError, match="LOCKSTEP_POLL_INTERVAL_S"):
        Settings()


def test_settings_are_frozen() -> None:
    with pytest.raises(ValidationError):
        Settings().poll_interval_s = 3  # type: ignore[misc]


def test_configuration_reference_is_current() -> None:
    hint = "regenerate: python -m lockstep.core.settings > docs/configuration.md"
    assert DOC.read_text() == reference_markdown(), hint

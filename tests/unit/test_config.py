"""Settings: environment parsing, and invalid values failing at start with a message naming the variable."""

from __future__ import annotations

import pytest

from service.cli import main
from service.config import ConfigError, load_settings


def test_env_prefix_and_comma_separated_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASKSERVE_API_KEYS", "a, b,,c")
    monkeypatch.setenv("MASKSERVE_MAX_BATCH_SIZE", "8")
    settings = load_settings(adapter="none")
    assert settings.api_keys == ["a", "b", "c"]
    assert settings.max_batch_size == 8


@pytest.mark.parametrize(
    ("overrides", "variable"),
    [
        ({"max_batch_size": 0}, "MASKSERVE_MAX_BATCH_SIZE"),
        ({"model": "/no/such/model"}, "MASKSERVE_MODEL"),
        ({"log_level": "loud"}, "MASKSERVE_LOG_LEVEL"),
        ({"default_max_new_tokens": 10, "max_new_tokens": 5}, "default_max_new_tokens must not exceed"),
    ],
)
def test_invalid_settings_name_the_variable(overrides: dict[str, object], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        load_settings(**overrides)


def test_cli_exits_2_with_the_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MASKSERVE_MAX_TOP_K", "-1")
    assert main(["info", "--adapter", "none"]) == 2
    assert "MASKSERVE_MAX_TOP_K" in capsys.readouterr().err

"""``maskserve … --help``: every flag of every subcommand has a meaning, its default and its choices, taken
from the object that holds the default (``Settings``, ``FinetuneConfig``, ``FillMaskEvalConfig``)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from collections.abc import Iterator

import pytest

from service.cli import _settings, build_parser, main
from service.cli_args import add_dataclass_flags, flag_name, from_args, option
from service.config import Settings
from service.training.config import MASK_STRATEGIES, FillMaskEvalConfig, FinetuneConfig, config_from_args

CONFIGS: dict[tuple[str, ...], type] = {("finetune",): FinetuneConfig, ("eval", "fill-mask"): FillMaskEvalConfig}


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command's parser, by its path of names: ("serve",), ("eval", "fill-mask"), …"""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from _commands(child, (*path, name))


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


COMMANDS = dict(_commands(build_parser()))


def _help_output(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _squeezed(text: str) -> str:
    # argparse wraps help to the terminal width, breaking at spaces and after hyphens
    return "".join(text.split())


def test_every_subcommand_is_covered() -> None:
    assert set(COMMANDS) == {("serve",), ("info",), ("finetune",), ("eval",), ("eval", "fill-mask")}
    assert all(_flags(COMMANDS[path]) for path in COMMANDS if path != ("eval",))


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_help_shows_every_flag_with_its_meaning_default_and_choices(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    out = _help_output(path, capsys)
    parser = COMMANDS[path]
    assert parser.description
    assert _squeezed(parser.description) in _squeezed(out)
    config_fields = {f.name for f in dataclasses.fields(CONFIGS[path])} if path in CONFIGS else set()
    for action in _flags(parser):
        (flag,) = action.option_strings
        assert action.help, flag
        meaning = action.help.split(" (default: ")[0].split(" (env ")[0]
        assert len(meaning) > 10, f"{flag}: {action.help!r}"
        assert _squeezed(action.help.replace("%%", "%")) in _squeezed(out), flag
        if action.choices is not None:
            assert action.default in action.choices, flag
            assert "{" + ",".join(action.choices) + "}" in out, flag
        if action.dest not in config_fields:
            # the parser's default stays None so MASKSERVE_* can apply; help shows Settings' default and variable
            assert action.default is None, flag
            default = Settings.model_fields[action.dest].get_default(call_default_factory=True)
            assert f"(default: {default}; env MASKSERVE_{action.dest.upper()})" in action.help, flag
        elif action.nargs == 0:  # a store_true switch: off unless given
            assert action.default is False, flag
        elif action.default not in (None, ""):
            assert f"(default: {action.default})" in action.help, flag


@pytest.mark.parametrize(("path", "cls"), list(CONFIGS.items()), ids=[" ".join(p) for p in CONFIGS])
def test_parser_defaults_are_the_dataclass_defaults(path: tuple[str, ...], cls: type) -> None:
    parser = COMMANDS[path]
    by_dest = {a.dest: a for a in _flags(parser)}
    args = build_parser().parse_args(list(path))
    for f in dataclasses.fields(cls):
        assert by_dest[f.name].option_strings == [flag_name(f.name)]
        assert getattr(args, f.name) == f.default, f.name
        assert type(getattr(args, f.name)) is type(f.default), f.name
        shown = by_dest[f.name].help
        assert shown is not None, f.name
        assert f.metadata["help"] in shown.replace("%%", "%"), f.name
    if cls is FinetuneConfig:
        assert config_from_args(args) == FinetuneConfig()


@pytest.mark.parametrize("path", [p for p in COMMANDS if p not in CONFIGS and p != ("eval",)], ids=" ".join)
def test_unset_settings_flags_leave_the_environment_then_the_settings_default(
    path: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(f"MASKSERVE_{name.upper()}", raising=False)
    names = [a.dest for a in _flags(COMMANDS[path])]
    settings = _settings(build_parser().parse_args(list(path)), *names)
    assert {n: getattr(settings, n) for n in names} == {n: getattr(Settings(), n) for n in names}
    monkeypatch.setenv("MASKSERVE_ADAPTER", "none")
    assert _settings(build_parser().parse_args(list(path)), *names).adapter == "none"


def test_flags_parse_to_their_field_types_and_override() -> None:
    parser = build_parser()
    args = parser.parse_args(["finetune", "--batch-size", "8", "--lr", "1e-3", "--objective", "sft", "--resume"])
    cfg = config_from_args(args)
    assert (cfg.batch_size, cfg.lr, cfg.objective, cfg.resume) == (8, 1e-3, "sft", True)
    assert type(cfg.objective) is str  # saved to finetune_config.json and compared as plain text
    serve = parser.parse_args(["serve", "--port", "9001", "--host", "0.0.0.0"])
    assert _settings(serve, "host", "port").port == 9001
    fill = parser.parse_args(["eval", "fill-mask", "--mode", "plain", "--limit", "3", "--update-card"])
    assert from_args(FillMaskEvalConfig, fill) == FillMaskEvalConfig(mode="plain", limit=3, update_card=True)


@pytest.mark.parametrize(
    "argv",
    [["finetune", "--objective", "bert"], ["finetune", "--save-dtype", "int8"], ["eval", "fill-mask", "--mode", "x"]],
)
def test_a_value_outside_the_choices_is_refused_naming_them(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_mask_strategy_choices_are_the_masking_strategies() -> None:
    from service.masks.input import MaskingStrategy

    assert tuple(MaskingStrategy) == MASK_STRATEGIES


def test_a_field_without_help_or_with_a_default_outside_its_choices_is_refused() -> None:
    @dataclasses.dataclass
    class NoHelp:
        steps: int = 3

    @dataclasses.dataclass
    class BadDefault:
        mode: str = option("fast", "how", choices=("slow", "exact"))

    with pytest.raises(ValueError, match="NoHelp.steps has no help"):
        add_dataclass_flags(argparse.ArgumentParser(), NoHelp)
    with pytest.raises(ValueError, match="BadDefault.mode: default 'fast'"):
        add_dataclass_flags(argparse.ArgumentParser(), BadDefault)


def test_building_the_parser_imports_no_torch() -> None:
    # ``maskserve --help`` must answer without loading torch (seconds); the configs are kept torch-free for it
    code = "import sys; from service.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

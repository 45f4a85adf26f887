"""argparse flags built from the objects that hold the defaults, so a flag's meaning, default and choices
are written once and ``--help`` cannot drift from what a run uses.

- Dataclass fields (``FinetuneConfig``): ``batch_size: int = option(16, "examples per step")`` becomes
  ``--batch-size BATCH_SIZE`` with ``type=int``, ``default=16`` and the help text plus ``(default: 16)``.
  Choices come from ``StrEnum`` members passed to ``option`` (or a ``StrEnum`` annotation) and show as
  ``--objective {auto,mlm,mntp,sft}``; a ``bool`` field is a ``store_true`` flag.
- ``Settings`` fields (``serve``, ``info``): the help is the field's ``description`` plus its default and
  environment variable. The parser's default stays ``None``, so an unset flag leaves ``MASKSERVE_*`` and
  then the ``Settings`` default in charge (the flag only overrides).

Kept free of torch imports so that ``maskserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Any, TypeVar, cast

from service.config import Settings

HELP = "help"
CHOICES = "choices"

T = TypeVar("T")
D = TypeVar("D")


def option(default: T, help: str, choices: Iterable[str] | None = None) -> T:
    """A dataclass field with its CLI help (and choices) beside its default."""
    metadata: dict[str, Any] = {HELP: help}
    if choices is not None:
        metadata[CHOICES] = tuple(str(c) for c in choices)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(text: str, default: object = None, env: str | None = None) -> str:
    """``text (default: x; env VAR)``; ``%`` escaped, as argparse %-formats help strings. Choices are not
    repeated here: argparse shows them as the metavar, ``--objective {auto,mlm,mntp,sft}``.
    """
    notes = []
    if default is not None and default != "":
        notes.append(f"default: {default}")
    if env:
        notes.append(f"env {env}")
    text = text.rstrip(".")
    return (f"{text} ({'; '.join(notes)})" if notes else text).replace("%", "%%")


def _scalar(annotation: Any) -> Any:
    """``int | None`` -> ``int``: argparse converts one value; None is the unset default, not a value."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _converter(annotation: Any, where: str) -> Callable[[str], Any]:
    kind = _scalar(annotation)
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        return str  # values stay plain strings, checked against the members by ``choices``
    if kind in (str, int, float):
        return cast(Callable[[str], Any], kind)
    raise TypeError(f"{where}: no command-line conversion for {annotation!r}")


def _enum_choices(annotation: Any) -> tuple[str, ...] | None:
    kind = _scalar(annotation)
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        return tuple(member.value for member in kind)
    return None


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass ``cls``, each declared with ``option``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        where = f"{cls.__name__}.{f.name}"
        text = f.metadata.get(HELP)
        if not text:
            raise ValueError(f"{where} has no help: declare it with option(default, help)")
        choices = f.metadata.get(CHOICES) or _enum_choices(hints[f.name])
        if choices is not None and f.default not in choices:
            raise ValueError(f"{where}: default {f.default!r} is not one of {choices}")
        if hints[f.name] is bool:
            if f.default is not False:
                raise ValueError(f"{where}: a store_true flag cannot default to {f.default!r}")
            parser.add_argument(flag_name(f.name), action="store_true", dest=f.name, help=_help(text))
            continue
        parser.add_argument(
            flag_name(f.name),
            type=_converter(hints[f.name], where),
            default=f.default,
            choices=choices,
            dest=f.name,
            metavar=None if choices else f.name.upper(),
            help=_help(text, f.default),
        )


def from_args(cls: type[D], args: argparse.Namespace) -> D:
    """The dataclass ``cls`` from the flags ``add_dataclass_flags`` added."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cast(Any, cls))})


def add_settings_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """Flags that override ``Settings`` fields; help from the field's description, default and variable."""
    prefix = Settings.model_config.get("env_prefix", "")
    for name in names:
        info = Settings.model_fields[name]
        where = f"Settings.{name}"
        if not info.description:
            raise ValueError(f"{where} has no description")
        choices = _enum_choices(info.annotation)
        parser.add_argument(
            flag_name(name),
            type=_converter(info.annotation, where),
            choices=choices,
            dest=name,
            help=_help(info.description, info.get_default(call_default_factory=True), f"{prefix}{name.upper()}"),
        )

"""Typed options: frozen keyword-only dataclasses, from which the CLI and the Python API are made.

Every stage takes its options as a frozen dataclass (``TrainingOptions``, ``SplitOptions``, a
target's ``CoreMLOptions``, ...), validated when it is built. A command's options class nests
those stage options as *groups* next to its own *leaves* (plain values). This module walks that
tree once, so that each leaf is spelled in exactly one place:

- its flat name (``learning_rate``, ``coreml_format``, ``float32_agreement``) is the keyword of
  the Python API (``toolchain.build(..., learning_rate=0.05)``) and the ``dest`` of its command
  line flag (``--learning-rate``);
- its type, default, choices and help text make the flag (:func:`add_arguments`), and the
  default appears in ``--help``;
- :func:`build` turns flat values (parsed flags, or API keywords) back into the nested options
  object, filling every value not given from the dataclass defaults. A flat name that belongs to
  no leaf is an :class:`~toolchain.errors.UnknownOption`: no flag or keyword can go nowhere.

A leaf is declared with :func:`option`, a group with :func:`group`; both are
``dataclasses.field`` with metadata. Classes derive from :class:`Options`, which coerces values
to the declared types (``str`` → ``Path``, ``list`` → ``tuple``, ``int`` → ``float``), refuses
wrong types and values outside ``choices`` as one-line UsageErrors, then calls ``validate()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from toolchain.errors import UnknownOption, UsageError

_KEY = "toolchain.option"


def option(default: Any = MISSING, help: str = "", *, name: str | None = None,
           flag: str | None = None, aliases: tuple[str, ...] = (), choices=None,
           metavar: str | None = None, positional: bool = False, append: bool = False,
           nargs: str | None = None, cli: bool = True, shown_default: str | None = None,
           title: str = ""):
    """A leaf option: a dataclass field with what the CLI and the API need to know.

    ``name`` is the flat name when it differs from the field's (``ArtifactMetadata.version`` is
    ``model_version``); ``flag`` the command-line spelling when it differs from ``--name``
    (``--target`` for ``targets``); ``append``/``nargs`` make a tuple option repeatable;
    ``cli=False`` keeps a field out of the command line (the API still takes it);
    ``shown_default`` is what ``--help`` says for the default when its value says too little;
    ``title`` the ``--help`` section of a leaf outside any group. ``help`` may be a function
    (called when the help is shown), for texts that list what is registered at run time.
    """
    meta = {"help": help, "name": name, "flag": flag, "aliases": tuple(aliases),
            "choices": tuple(choices) if choices is not None else None, "metavar": metavar,
            "positional": positional, "append": append, "nargs": nargs, "cli": cli,
            "shown_default": shown_default, "title": title}
    return dataclasses.field(default=default, metadata={_KEY: meta})


def group(default: Any = None, *, factory=None, prefix: str = "", title: str = ""):
    """A nested options object whose leaves take ``prefix`` before their names.

    ``title`` heads its flags in ``--help``. ``factory`` builds the default lazily (the targets'
    options, which depend on the registry); otherwise ``default`` is the (frozen) instance.
    """
    meta = {"group": True, "prefix": prefix, "title": title}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={_KEY: meta})
    return dataclasses.field(default=default, metadata={_KEY: meta})


@dataclass(frozen=True)
class Leaf:
    """One value of an options tree, as the CLI and the API see it."""

    name: str
    path: tuple[str, ...]
    type: Any
    default: Any
    help: Any
    choices: tuple | None
    metavar: str | None
    flag: str
    aliases: tuple[str, ...]
    positional: bool
    append: bool
    nargs: str | None
    cli: bool
    title: str
    shown_default: str | None

    @property
    def required(self) -> bool:
        return self.default is MISSING


@dataclass(frozen=True)
class Options:
    """Base of every options class: coerce and check each field, then ``validate()``."""

    #: What this class's flags start with when it is a group with a prefix everywhere it is
    #: used (a target's options: ``tflite_``), so its one-line errors name the real flag.
    FLAG_PREFIX: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for field in dataclasses.fields(self):
            meta = field.metadata.get(_KEY, {})
            value = getattr(self, field.name)
            if meta.get("group"):
                default = _field_default(field)
                if not isinstance(value, type(default)):
                    raise UsageError(f"{field.name} must be a {type(default).__name__}, "
                                     f"not {value!r}")
                continue
            label = _label(meta, field.name, type(self).FLAG_PREFIX)
            coerced = _coerce(value, hints[field.name], label)
            if meta.get("choices") is not None and coerced is not None and not (
                    isinstance(coerced, tuple) and not coerced):
                for item in coerced if isinstance(coerced, tuple) else (coerced,):
                    if item not in meta["choices"]:
                        raise UsageError(f"{label} takes {_or(meta['choices'])}, not {item!r}")
            if coerced is not value:
                object.__setattr__(self, field.name, coerced)
        self.validate()

    def aimed_at(self, thresholds) -> Options:
        """These options for a build whose verifier judges with ``thresholds``
        (:class:`toolchain.statistics.Thresholds`). A target's options whose repair aims at
        the verifier's threshold override it; unchanged by default."""
        return self

    def validate(self) -> None:
        """Check values against each other; raise UsageError. Subclasses override."""


def leaves(cls: type, prefix: str = "", path: tuple[str, ...] = (), defaults: Any = None,
           title: str = "") -> list[Leaf]:
    """Every leaf of an options class, depth first, with its flat name and default.

    A group's leaves take their defaults from the group's default instance, so one class can
    serve with different defaults (the float32 and int8 verification thresholds).
    """
    found: list[Leaf] = []
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        meta = field.metadata.get(_KEY)
        if meta is None:
            continue
        default = getattr(defaults, field.name) if defaults is not None else _field_default(field)
        if meta.get("group"):
            found += leaves(type(default), prefix + meta["prefix"], (*path, field.name), default,
                            meta["title"] or title)
            continue
        name = prefix + (meta["name"] or field.name)
        found.append(Leaf(
            name=name, path=(*path, field.name), type=hints[field.name], default=default,
            help=meta["help"], choices=meta["choices"], metavar=meta["metavar"],
            flag=meta["flag"] or name, aliases=meta["aliases"], positional=meta["positional"],
            append=meta["append"], nargs=meta["nargs"], cli=meta["cli"],
            title=meta["title"] or title,
            shown_default=meta["shown_default"]))
    return found


def build(cls: type, values: Mapping[str, Any], *, where: str = "") -> Any:
    """The ``cls`` object for flat ``values`` (flag dests or API keywords); defaults fill in.

    A name no leaf has is an UnknownOption naming the closest ones; a required leaf without a
    value is a UsageError naming its flag.
    """
    known = {leaf.name: leaf for leaf in leaves(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=3)
        raise UnknownOption(f"{where or cls.__name__} has no option {unknown[0]!r}",
                            hint=("did you mean " + _or(close) + "?") if close else
                            "known options: " + ", ".join(sorted(known)))
    return _assemble(cls, values, "", None)


def flatten(options: Any) -> dict[str, Any]:
    """The flat ``{name: value}`` of every leaf of an options object (the inverse of build)."""
    out = {}
    for leaf in leaves(type(options)):
        value = options
        for part in leaf.path:
            value = getattr(value, part)
        out[leaf.name] = value
    return out


def given(options: Any) -> dict[str, Any]:
    """The leaves whose values differ from their defaults: what the user actually chose."""
    defaults = {leaf.name: leaf.default for leaf in leaves(type(options))}
    return {name: value for name, value in flatten(options).items()
            if defaults[name] is MISSING or value != defaults[name]}


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per command-line leaf of ``cls``, under its group's title.

    Defaults stay out of the namespace (``argparse.SUPPRESS``): :func:`build` takes them from the
    dataclasses, so a default lives in one place, and ``--help`` prints it from there.
    """
    sections: dict[str, Any] = {}
    for leaf in leaves(cls):
        if not leaf.cli:
            continue
        if leaf.title and leaf.title not in sections:
            sections[leaf.title] = parser.add_argument_group(leaf.title)
        where = sections.get(leaf.title, parser)
        inner = _inner(leaf.type)
        kwargs: dict[str, Any] = {"help": _help(leaf)}
        if leaf.choices is not None:
            kwargs["choices"] = leaf.choices
        if inner is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _parser_type(inner)
            kwargs["metavar"] = leaf.metavar or (None if leaf.choices else _metavar(leaf))
            if leaf.append:
                kwargs["action"] = "append"
            elif leaf.nargs:
                kwargs["nargs"], kwargs["action"] = leaf.nargs, "extend"
        if leaf.positional:
            where.add_argument(leaf.name, **kwargs)
            continue
        kwargs["dest"] = leaf.name
        kwargs["default"] = argparse.SUPPRESS
        if leaf.required:
            kwargs["required"] = True
        flags = ["--" + leaf.flag.replace("_", "-"), *("--" + a for a in leaf.aliases)]
        where.add_argument(*flags, **kwargs)


def command_values(namespace: argparse.Namespace, cls: type,
                   cli_only: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flat values of a parsed command line (argparse's own bookkeeping left out)."""
    values = {key: value for key, value in vars(namespace).items() if key not in cli_only}
    for leaf in leaves(cls):
        if leaf.positional and leaf.name in values and values[leaf.name] is None:
            del values[leaf.name]
    return values


# -- internals ---------------------------------------------------------------------------------


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not MISSING:
        return field.default
    if field.default_factory is not MISSING:
        return field.default_factory()
    return MISSING


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _assemble(cls: type, values: Mapping[str, Any], prefix: str, defaults: Any) -> Any:
    kwargs = {}
    changed = False
    for field in dataclasses.fields(cls):
        meta = field.metadata.get(_KEY)
        if meta is None or not field.init:
            continue
        default = getattr(defaults, field.name) if defaults is not None else _field_default(field)
        if meta.get("group"):
            value = _assemble(type(default), values, prefix + meta["prefix"], default)
        else:
            name = prefix + (meta["name"] or field.name)
            if name in values:
                value = values[name]
            elif default is MISSING:
                raise UsageError(f"{_label(meta, field.name, prefix)} is required")
            else:
                value = default
        changed = changed or value is not default
        kwargs[field.name] = value
    if defaults is not None and not changed:
        return defaults
    return cls(**kwargs)


def _label(meta: Mapping, field_name: str, prefix: str = "") -> str:
    name = prefix + (meta.get("name") or field_name)
    if meta.get("positional"):
        return name.upper()
    return "--" + (meta.get("flag") or name).replace("_", "-")


def _or(items) -> str:
    items = [str(item) for item in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _inner(annotation: Any) -> Any:
    """``X`` for ``X``, ``X | None`` and ``tuple[X, ...]``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _inner(args[0]) if len(args) == 1 else annotation
    if origin is tuple:
        args = typing.get_args(annotation)
        return args[0] if len(args) == 2 and args[1] is Ellipsis else annotation
    return annotation


def _optional(annotation: Any) -> bool:
    return (typing.get_origin(annotation) in (typing.Union, types.UnionType)
            and type(None) in typing.get_args(annotation))


def _coerce(value: Any, annotation: Any, label: str) -> Any:
    """``value`` as the declared type, or a UsageError naming the option."""
    if value is None and _optional(annotation):
        return None
    inner = _inner(annotation)
    base = annotation
    if _optional(annotation):
        base = [a for a in typing.get_args(annotation) if a is not type(None)][0]
    if typing.get_origin(base) is tuple:
        if isinstance(value, (str, os.PathLike)):
            value = (value,)
        if not isinstance(value, (tuple, list)):
            raise UsageError(f"{label} takes a list, not {value!r}")
        return tuple(_scalar(item, inner, label) for item in value)
    return _scalar(value, inner, label)


def _scalar(value: Any, kind: Any, label: str) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{label} takes True or False, not {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{label} takes a whole number, not {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{label} takes a number, not {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise UsageError(f"{label} takes text, not {value!r}")
        return value
    if kind is Path:
        if not isinstance(value, (str, os.PathLike)):
            raise UsageError(f"{label} takes a path, not {value!r}")
        return value if isinstance(value, Path) else Path(value)
    return value


def _parser_type(kind: Any):
    return {int: int, float: float, Path: Path}.get(kind, str)


def _metavar(leaf: Leaf) -> str:
    inner = _inner(leaf.type)
    if inner is Path:
        return "DIR" if leaf.name.endswith("_dir") else "PATH"
    return {int: "N", float: "X"}.get(inner, "TEXT")


def _help(leaf: Leaf) -> str:
    text = leaf.help() if callable(leaf.help) else leaf.help
    text = text.replace("%", "%%")  # argparse %-formats help texts
    empty = leaf.required or leaf.default is None or leaf.default is False or \
        leaf.default == ()
    if empty and leaf.shown_default is not None:
        shown = leaf.shown_default
    elif empty:
        return text
    else:
        value = leaf.default
        shown = ", ".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}" \
            if isinstance(value, float) else str(value)
    return f"{text} (default: {shown})" if text else f"default: {shown}"

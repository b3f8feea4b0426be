"""Recipe configuration: a dataclass of options, filled defaults < YAML < CLI.

Each recipe declares one dataclass whose fields carry their help text and
argparse group in ``field(metadata=...)``; :func:`parse_config` turns it into a
grouped ``--help``, reads ``-c/--config file.yaml`` and the command line, and
fails on any unknown key with the closest valid spelling.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A user mistake in a config file or on the command line."""


def option(default: Any, help: str, group: str = "misc", choices: Sequence[Any] | None = None) -> Any:
    """Declare one recipe option: its default, its ``--help`` text and its group."""
    meta = {"help": help, "group": group, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def closest(name: str, valid: Sequence[str]) -> str:
    """' (did you mean X?)' for the nearest valid name, or '' if none is near."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _scalar_type(tp: Any) -> Any:
    """The type argparse converts with: ``int | None`` -> int, ``list[int]`` -> int."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return args[0] if args else str
    if args:
        return args[0]
    return tp


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(convert):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        allow_abbrev=False,
    )
    parser.add_argument(
        "-c", "--config", metavar="YAML", default=None,
        help="recipe YAML; its keys are the option names below with underscores "
        "(precedence: defaults < YAML < command line)",
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        group_name = f.metadata.get("group", "misc")
        group = groups.get(group_name) or groups.setdefault(group_name, parser.add_argument_group(group_name))
        tp = types[f.name]
        scalar = _scalar_type(tp)
        nullable = type(None) in typing.get_args(tp)
        convert = _parse_bool if scalar is bool else scalar
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = " ".join(map(str, default)) if isinstance(default, list) else default
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "help": f"{f.metadata.get('help', '')} (default: {shown})",
            "type": _optional(convert) if nullable else convert,
            "default": argparse.SUPPRESS,
        }
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if typing.get_origin(tp) in (list, tuple):
            kwargs["nargs"] = "+"
        if scalar is bool:
            kwargs["metavar"] = "{true,false}"
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    return parser


def _coerce(cls: type, name: str, value: Any, source: str) -> Any:
    """Check a YAML value against the field's type; convert ints to floats."""
    tp = _field_types(cls)[name]
    scalar = _scalar_type(tp)
    if value is None:
        if type(None) in typing.get_args(tp):
            return None
        raise ConfigError(f"{source}: key '{name}' may not be null")
    if typing.get_origin(tp) in (list, tuple):
        if not isinstance(value, list):
            value = [value]
        return [_coerce_scalar(scalar, name, v, source) for v in value]
    return _coerce_scalar(scalar, name, value, source)


def _coerce_scalar(scalar: Any, name: str, value: Any, source: str) -> Any:
    if scalar is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # PyYAML reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if scalar is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: key '{name}' must be true or false, got {value!r}")
    if not isinstance(value, scalar) or (scalar is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: key '{name}' must be {scalar.__name__}, got {value!r}")
    return value


def load_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a recipe YAML, rejecting unknown keys with a suggestion."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm not in names:
            raise ConfigError(f"{path}: unknown key '{key}'{closest(norm, names)}")
        out[norm] = _coerce(cls, norm, value, str(path))
        choices = next(f.metadata.get("choices") for f in dataclasses.fields(cls) if f.name == norm)
        if choices and out[norm] not in choices:
            raise ConfigError(f"{path}: {norm}: '{value}' is not one of {', '.join(map(str, choices))}"
                              f"{closest(str(value), [str(c) for c in choices])}")
    return out


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str = "") -> T:
    """Defaults < ``--config`` YAML < command line, as an instance of ``cls``."""
    parser = build_parser(cls, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [a for a in parser._option_string_actions if a.startswith("--")]
        bad = next((u for u in unknown if u.startswith("-")), unknown[0])
        parser.error(f"unknown option '{bad}'{closest(bad.split('=')[0], flags)}")
    try:
        values = load_yaml(args.config, cls) if args.config else {}
        values.update({k: v for k, v in vars(args).items() if k != "config"})
        return cls(**values)
    except ConfigError as err:
        parser.error(str(err))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

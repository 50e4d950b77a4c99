"""YAML -> typed dataclasses, with dotted `key=value` overrides and errors that name the offending key.

One mechanism for every config in the project (model, training job): `load_config(cls, path, overrides)`.

- Values (in files and overrides) are YAML, read with YAML 1.2's numbers: `1e-3` is a float (PyYAML alone reads
  it as a string), `[0.9, 0.95]` a list, `true` a bool, `null` None. An int field takes an integral float (`3e4`).
- An override `a.b.c=v` sets one leaf and keeps its siblings; `deep_merge` overlays one mapping on another the same
  way (a recipe's `model:` keys over its `model_file`).
- Dataclasses validate their values in `__post_init__` with `check(ok, key, message)`; every error is a one-line
  `ConfigError` naming the full dotted key (`optimizer.lr: must be > 0, got -1.0`). `run_cli(main)` runs a command
  line entry point and prints a ConfigError as that line (no traceback), exit status 2.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Mapping, NoReturn, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its dataclass; the message names the key."""


class FieldError(ConfigError):
    """A bad value found by a dataclass's own checks; `from_mapping` prefixes `key` with the section's path."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def check(ok: bool, key: str, message: str) -> None:
    """Raise FieldError(key, message) unless `ok` (for dataclass `__post_init__` validation)."""
    if not ok:
        raise FieldError(key, message)


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats without a dot (`1e-3`, `5E+2`) as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text (safe), with YAML 1.2 floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overlay`'s keys set; mappings merge key by key at every depth, other values (lists too) replace."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def run_cli(
    main: Callable[[], int | None], errors: tuple[type[BaseException], ...] = (ConfigError,), prog: str | None = None
) -> NoReturn:
    """`sys.exit(main())`, printing an error of `errors` (default ConfigError) as one line `<prog>: error: <msg>` on
    stderr with exit status 2 instead of a traceback. `prog` defaults to the script's file name."""
    try:
        code = main()
    except errors as e:
        prog = prog or (Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "error")
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code)


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Build `cls` from a YAML file (optional) and `key.sub=value` overrides (values parsed as YAML scalars)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = load_yaml(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        data = loaded or {}
    for override in overrides:
        apply_override(data, override)
    try:
        return from_mapping(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set data[a][b] = value for "a.b=value" (in place), keeping b's siblings; the value is parsed as YAML ("2" -> 2,
    "1e-3" -> 0.001, "[1, 2]" -> a list, "null" -> None)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: not a YAML value ({' '.join(str(e).split())})") from None


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Instantiate dataclass `cls` from a mapping, checking keys and types recursively."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key '{where}{unknown[0]}'; known keys of {where or 'the config'}: {sorted(fields)}")
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise ConfigError(f"{where}{e.key}: {e.message}") from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def to_mapping(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a config dataclass (round-trips through `from_mapping`)."""
    return dataclasses.asdict(obj)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple and args and args[-1] is not Ellipsis:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)}, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value

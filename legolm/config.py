"""Config dataclasses <-> dicts and YAML: coercion, merging, loading, dumping and key listing.

A config is a dataclass whose nested dataclasses are YAML sections. `config_from_dict` builds one
from a nested dict (missing keys keep their defaults; unknown keys and ill-typed values are one-line
`ConfigError`s that list the valid keys); `load_yaml` / `parse_yaml` read YAML without aliases,
`merge` layers dicts (later wins), `dump_yaml` writes a config back in the format `--config` reads,
and `config_keys` lists the dotted leaf keys. The command line's flags (`legolm.cli.args`) are
built on these; so are the recipes, `fit` (the run's config.yaml) and the benchmarks.

A ``bool | None`` setting (None = decide automatically) takes ``auto`` (or ``null``) as its YAML value.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml

from legolm.errors import ConfigError

T = TypeVar("T")
_NULL = ("none", "null", "~")
AUTO = "auto"  # the value of a ``bool | None`` setting that leaves the choice to legolm (None)


def scalar_type(tp: Any) -> Any:
    """Strip ``X | None`` to X."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def is_optional(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def is_bool(tp: Any) -> bool:
    """``bool`` or ``bool | None``: an on/off flag."""
    return scalar_type(tp) is bool


# -- values --------------------------------------------------------------------------------------------
def type_name(tp: Any) -> str:
    if get_origin(tp) is typing.Literal:
        return "one of " + "|".join(map(str, get_args(tp)))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` (from YAML or a flag's text) as type ``tp``, else a `ConfigError` naming ``key``."""
    bad = ConfigError(f"config key {key}: expected {type_name(tp)}, got {value!r}"
                      + (" (NaN is no setting)" if isinstance(value, (str, float)) and str(value).lower() == "nan"
                         else ""))
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        auto = is_bool(tp) and isinstance(value, str) and value.lower() == AUTO
        if value is None or auto or (isinstance(value, str) and value.lower() in _NULL):
            if is_optional(tp):
                return None
            raise bad
        inner = scalar_type(tp)
        if get_origin(inner) in (list, dict):
            return coerce(value, inner, key)
        try:
            return coerce(value, inner, key)
        except ConfigError:
            raise bad from None
    if value is None:
        raise bad
    if origin is typing.Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin is list:
        if isinstance(value, str):
            value = _parse_flag_yaml(value, bad) if value.startswith("[") else [value]
        if not isinstance(value, list):
            raise bad
        return [coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = _parse_flag_yaml(value, bad)
        if not isinstance(value, dict):
            raise bad
        key_type, value_type = get_args(tp) or (Any, Any)
        return {coerce(k, key_type, f"{key}.<key>"): coerce(v, value_type, f"{key}[{k!r}]") for k, v in value.items()}
    converter = _SCALARS.get(tp)
    if converter is None:
        return value
    try:
        return converter(value)
    except (TypeError, ValueError):
        raise bad from None


def _parse_flag_yaml(text: str, bad: ConfigError) -> Any:
    """A list or mapping written as YAML in a flag (``[1, 2]``, ``{q: 4}``); unparsable text raises ``bad``."""
    try:
        return parse_yaml(text)
    except yaml.YAMLError:
        raise bad from None


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return v.lower() in ("true", "yes", "on", "1")
    raise ValueError(v)


def _to_int(v: Any) -> int:
    if isinstance(v, (bool, float)):
        raise ValueError(v)
    return int(v)


def _to_float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(v)
    out = float(v)  # also "3e-4", which YAML 1.1 reads as a string
    if math.isnan(out):  # NaN is no setting (it passes no range check: NaN compares false)
        raise ValueError(v)
    return out


def _to_str(v: Any) -> str:
    if isinstance(v, (dict, list)):
        raise ValueError(v)
    return str(v)


_SCALARS: dict[Any, Callable[[Any], Any]] = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}


# -- dict <-> dataclass --------------------------------------------------------------------------------
def dataclass_fields(cls: type) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def config_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf key -> type, for every field of ``cls`` and its nested dataclasses."""
    keys: dict[str, Any] = {}
    for name, (_, tp) in dataclass_fields(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.update(config_keys(tp, f"{prefix}{name}."))  # type: ignore[arg-type]
        else:
            keys[prefix + name] = tp
    return keys


def unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    valid = sorted(dataclass_fields(cls))
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    where = f"of {prefix.rstrip('.')} " if prefix else ""
    return ConfigError(f"unknown config key {prefix}{key}{hint}; valid keys {where}are: {', '.join(valid)}")


def config_from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", base: T | None = None) -> T:
    """Build dataclass ``cls`` from a nested dict; missing keys keep their defaults.

    A nested section starts from the enclosing field's own default (``default_factory``), so a
    YAML section that sets one key keeps the other keys the command chose as defaults.
    """
    fields = dataclass_fields(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in fields:
            raise unknown_key(cls, name, prefix)
        f, tp = fields[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix}{name} is a section: give it a mapping of keys, not {value!r}")
            kwargs[name] = config_from_dict(tp, value, f"{prefix}{name}.", _field_default(f, base))  # type: ignore
        else:
            kwargs[name] = coerce(value, tp, prefix + name)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)  # type: ignore
    except TypeError as err:
        raise ConfigError(f"config section {prefix.rstrip('.') or cls.__name__}: {err}") from None


def _field_default(f: dataclasses.Field[Any], owner: Any) -> Any:
    """The current value of field ``f`` in ``owner``, else the field's default (None when it has none)."""
    if owner is not None:
        return getattr(owner, f.name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def dump_yaml(config: Any) -> str:
    """A dataclass config as YAML (the format `--config` reads)."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)


class _NoAliasLoader(yaml.SafeLoader):
    """YAML's safe loader without anchors/aliases: a config never needs them, and an alias bomb
    (a few hundred bytes that expand to billions of nodes) must not reach the program."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "YAML aliases (*name) are not allowed in legolm configs",
                                              event.start_mark)
        return super().compose_node(parent, index)


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` without aliases; errors (bad syntax, too deep a nesting) as ``yaml.YAMLError``."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass: no Python objects
    except RecursionError:
        raise yaml.YAMLError("the document nests too deeply") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; a missing file or one that is not a mapping is a `ConfigError`."""
    path = Path(path)
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read config file {path} ({err.strerror}); check the --config path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as err:
        first = " ".join(str(err).split())
        raise ConfigError(f"config file {path} is not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys (like `optim: {{lr: 3.0e-4}}`)")
    return data


def nested(pairs: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Dotted keys and their values as a nested dict: ``[("a.b", 1), ("c", 2)]`` -> ``{"a": {"b": 1}, "c": 2}``."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        *sections, leaf = key.split(".")
        node = out
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return out


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge nested dicts; values of ``override`` win."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out

"""Dataclass-driven options: a config dataclass's fields are its flags and its YAML keys.

Flat (`add_dataclass_args`): ``field_name: int = 3`` becomes ``--field-name INT`` (default 3); the
field's line in the docstring's ``Attributes:`` section is its help.

Every on/off setting has one style, flat or nested: a ``bool`` field is a ``--flag / --no-flag``
pair that takes no value; a ``bool | None`` field (None = decide automatically, e.g. the fused
AdamW kernel on CUDA only) is the same pair plus ``--flag auto``, and ``auto`` (or ``null``) is
also its YAML spelling.

Nested (`add_config_args` / `resolve_config`, jsonargparse-style): nested dataclasses are YAML
sections and dotted flags (``--optim.lr 3e-4``, ``--model.layers pythia pythia``, underscores or
dashes). Values are resolved in this order, later wins::

    dataclass defaults  <  base dict (e.g. a resumed run's saved config)  <  --config a.yaml  <  flags

Unknown keys (in YAML or flags) and ill-typed values are one-line `ConfigError`s that list the
valid keys; ``--print-config`` dumps the resolved YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml

from legolm.errors import ConfigError

T = TypeVar("T")
_DEST = "cfg:"  # argparse dest prefix of the dotted flags
_NULL = ("none", "null", "~")
AUTO = "auto"  # the value of a ``bool | None`` setting that leaves the choice to legolm (None)


def _attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the ``Attributes:`` sections of ``cls`` and its bases (continuation lines joined)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        found = re.findall(r"^ {8}(\w+): (.+(?:\n {12,}\S.*)*)", klass.__doc__ or "", flags=re.MULTILINE)
        docs.update({name: " ".join(text.split()) for name, text in found})
    return docs


def _scalar_type(tp: Any) -> Any:
    """Strip ``X | None`` to X."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def _optional(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def _is_bool(tp: Any) -> bool:
    """``bool`` or ``bool | None``: an on/off flag."""
    return _scalar_type(tp) is bool


class OnOffAction(argparse.Action):
    """``--x`` (true) / ``--no-x`` (false), and for a ``bool | None`` setting also ``--x auto`` (None).

    Like `argparse.BooleanOptionalAction`, plus the one value ``auto`` where the setting has an
    automatic choice: no on/off flag takes true/false/none as a value.
    """

    def __init__(self, option_strings: list[str], dest: str, auto: bool = False, **kwargs: Any) -> None:
        flags = [f for s in option_strings for f in (s, "--no-" + s[2:])]
        self.auto = auto
        super().__init__(flags, dest, nargs="?" if auto else 0, metavar=AUTO if auto else None, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        flag = option_string or self.option_strings[0]
        negated = flag.startswith("--no-")
        values = None if values == [] else values  # nargs=0 passes []
        if values is not None and (negated or values != AUTO):
            on = "--" + flag[5:] if negated else flag
            raise argparse.ArgumentError(self, f"takes no value except {AUTO} ({on} turns it on, --no-{on[2:]} "
                                               f"off, {on} {AUTO} leaves the choice to legolm); got {values!r}")
        setattr(namespace, self.dest, None if values == AUTO else not negated)

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


# -- flat flags (legolm generate) ---------------------------------------------------------------------
def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = _scalar_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f"{docs.get(f.name, '')} (default: {_shown(default, tp)})"
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=OnOffAction, auto=_optional(hints[f.name]), default=default,
                               help=help_)
        elif get_origin(tp) is typing.Literal:
            group.add_argument(flag, dest=f.name, choices=get_args(tp), default=default, help=help_)
        elif get_origin(tp) in (list, tuple):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else default
            group.add_argument(flag, dest=f.name, nargs="+", type=get_args(tp)[0], default=default,
                               help=f"{docs.get(f.name, '')} (default: {default})")
        else:
            group.add_argument(flag, dest=f.name, type=_flag_type(tp, f.name), metavar=_metavar(tp), default=default,
                               help=help_)


def dataclass_from_args(cls: type[T], ns: argparse.Namespace) -> T:
    """Build ``cls`` from the parsed flags that `add_dataclass_args` added."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


# -- values --------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    if get_origin(tp) is typing.Literal:
        return "one of " + "|".join(map(str, get_args(tp)))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` (from YAML or a flag's text) as type ``tp``, else a `ConfigError` naming ``key``."""
    bad = ConfigError(f"config key {key}: expected {_type_name(tp)}, got {value!r}"
                      + (" (NaN is no setting)" if isinstance(value, (str, float)) and str(value).lower() == "nan"
                         else ""))
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        auto = _is_bool(tp) and isinstance(value, str) and value.lower() == AUTO
        if value is None or auto or (isinstance(value, str) and value.lower() in _NULL):
            if _optional(tp):
                return None
            raise bad
        inner = _scalar_type(tp)
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
def _fields(cls: type) -> dict[str, tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def config_keys(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted leaf key -> type, for every field of ``cls`` and its nested dataclasses."""
    keys: dict[str, Any] = {}
    for name, (_, tp) in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            keys.update(config_keys(tp, f"{prefix}{name}."))  # type: ignore[arg-type]
        else:
            keys[prefix + name] = tp
    return keys


def _unknown_key(cls: type, key: str, prefix: str) -> ConfigError:
    valid = sorted(_fields(cls))
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    where = f"of {prefix.rstrip('.')} " if prefix else ""
    return ConfigError(f"unknown config key {prefix}{key}{hint}; valid keys {where}are: {', '.join(valid)}")


def config_from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", base: T | None = None) -> T:
    """Build dataclass ``cls`` from a nested dict; missing keys keep their defaults.

    A nested section starts from the enclosing field's own default (``default_factory``), so a
    YAML section that sets one key keeps the other keys the command chose as defaults.
    """
    fields = _fields(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in fields:
            raise _unknown_key(cls, name, prefix)
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


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge nested dicts; values of ``override`` win."""
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# -- nested flags --------------------------------------------------------------------------------------
def add_config_args(parser: argparse.ArgumentParser, cls: type, aliases: dict[str, str] | None = None) -> None:
    """``--config FILE.yaml``, ``--print-config`` and one dotted flag per leaf field of ``cls``.

    Args:
        parser: Where to add them.
        cls: The config dataclass.
        aliases: Extra short on/off flags for boolean keys, e.g. ``{"--overwrite": "run.overwrite"}``
            (``--overwrite / --no-overwrite``).
    """
    parser.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                        help="YAML file of config values (repeatable; flags override it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    for flag, key in (aliases or {}).items():
        parser.add_argument(flag, dest=_DEST + key, action=OnOffAction, default=argparse.SUPPRESS,
                            help=f"same as --{key}")
    _add_section(parser, cls, "")
    keys = set(config_keys(cls))
    parse = parser.parse_known_args

    def strict(args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        ns, extras = parse(args, namespace)
        flags = [a for a in extras if a.startswith("--")]
        if flags:
            parser.error(str(_unknown_flag(cls, flags[0], keys)))
        return ns, extras

    setattr(parser, "parse_known_args", strict)  # noqa: B010  (argparse calls it on subparsers)


def _unknown_flag(cls: type, flag: str, keys: set[str]) -> ConfigError:
    key = flag[2:].split("=")[0].replace("-", "_")
    section, _, leaf = key.rpartition(".")
    sub: Any = cls
    for part in filter(None, section.split(".")):
        tp = _fields(sub).get(part, (None, None))[1]
        if not dataclasses.is_dataclass(tp):
            close = difflib.get_close_matches(key, sorted(keys), n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            return ConfigError(f"unknown flag {flag}{hint}; valid sections: {', '.join(_sections(cls))}")
        sub = tp
    return _unknown_key(sub, leaf, f"{section}." if section else "")


def _sections(cls: type) -> list[str]:
    return [n for n, (_, tp) in _fields(cls).items() if dataclasses.is_dataclass(tp)]


def _add_section(parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
    docs = _attribute_docs(cls)
    group = parser.add_argument_group(prefix.rstrip(".") or cls.__name__)
    nested: list[tuple[str, Any]] = []
    for name, (f, tp) in _fields(cls).items():
        if dataclasses.is_dataclass(tp):
            nested.append((name, tp))
            continue
        key = prefix + name
        flags = list(dict.fromkeys(["--" + key.replace("_", "-"), "--" + key]))
        default = f.default if f.default is not dataclasses.MISSING else "(see YAML)"
        kw: dict[str, Any] = dict(dest=_DEST + key, default=argparse.SUPPRESS,
                                  help=f"{docs.get(name, '')} (default: {_shown(default, tp)})")
        if _is_bool(tp):
            group.add_argument(*flags, action=OnOffAction, auto=_optional(tp), **kw)
        elif get_origin(_scalar_type(tp)) is list:
            group.add_argument(*flags, nargs="+", type=_flag_type(tp, key, list_item=True), metavar="VALUE", **kw)
        else:
            group.add_argument(*flags, type=_flag_type(tp, key), metavar=_metavar(tp), **kw)
    for name, tp in nested:
        _add_section(parser, tp, f"{prefix}{name}.")


def _shown(default: Any, tp: Any) -> Any:
    """A default as the command line spells it (None of an on/off setting is ``auto``)."""
    return AUTO if default is None and _is_bool(tp) else default


def _metavar(tp: Any) -> str:
    inner = _scalar_type(tp)
    if get_origin(inner) is typing.Literal:
        return "{" + ",".join(map(str, get_args(inner))) + "}"
    return getattr(inner, "__name__", "VALUE").upper()


def _flag_type(tp: Any, key: str, list_item: bool = False) -> Callable[[str], Any]:
    """argparse ``type=``: the flag's text coerced to ``tp`` (to its items for ``nargs='+'`` lists)."""
    item = get_args(_scalar_type(tp))[0] if list_item else tp

    def convert(text: str) -> Any:
        try:
            return coerce(text, item, key)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None

    convert.__name__ = _type_name(item)
    return convert


def cli_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """The dotted flags given on the command line, as a nested dict."""
    out: dict[str, Any] = {}
    for dest, value in vars(ns).items():
        if dest.startswith(_DEST):
            *sections, leaf = dest[len(_DEST):].split(".")
            node = out
            for s in sections:
                node = node.setdefault(s, {})
            node[leaf] = value
    return out


def resolve_config(cls: type[T], ns: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
    """Defaults < ``base`` < each ``--config`` file < command-line flags, checked and typed."""
    data = dict(base or {})
    config_from_dict(cls, data)
    for path in ns.config:
        layer = load_yaml(path)
        try:
            config_from_dict(cls, layer)
        except ConfigError as err:
            raise ConfigError(f"config file {path}: {err}") from None
        data = merge(data, layer)
    data = merge(data, cli_overrides(ns))
    return config_from_dict(cls, data)


def resolve_run_config(cls: type[T], ns: argparse.Namespace) -> T:
    """`resolve_config` for a training command: with ``--resume`` the run's saved config.yaml is the base layer."""
    cfg = resolve_config(cls, ns)
    saved = Path(cfg.run.out_dir) / "config.yaml"  # type: ignore[attr-defined]
    if cfg.run.resume and saved.is_file():  # type: ignore[attr-defined]
        base = load_yaml(saved)
        base.get("run", {}).pop("overwrite", None)
        cfg = resolve_config(cls, ns, base)
    return cfg

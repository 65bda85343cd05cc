"""The command line's options, built from config dataclasses: a config's keys are its flags.

The dict/YAML side (coercion, merging, loading, dumping, key listing) is `legolm.config`; this
module holds only the argparse front door. Every command has one config dataclass and one flag
style (`add_config_args` / `resolve_config`, jsonargparse-style): a top-level field is a flag of its
own name (``max_new_tokens: int = 64`` is ``--max-new-tokens INT``), a nested dataclass is a YAML
section and a dotted prefix (``--optim.lr 3e-4``, ``--model.layers pythia pythia``); underscores
or dashes. The field's line in the docstring's ``Attributes:`` section is its help. A list setting
takes several values, and given twice it adds to them (``--prompt a --prompt b``).

Every on/off setting has one style: a ``bool`` field is a ``--flag / --no-flag`` pair that takes no
value; a ``bool | None`` field (None = decide automatically, e.g. the fused AdamW kernel on CUDA
only) is the same pair plus ``--flag auto``, and ``auto`` (or ``null``) is also its YAML spelling.

Aliases are the one way to give a dotted key a short flat name: a command passes
``{"--data": "data.source", "--overwrite": "run.overwrite"}`` to `add_config_args`, and the short
flag is another name of the same option (an on/off key's short name gets its ``--no-`` form too).

Values are resolved in this order, later wins::

    dataclass defaults  <  base dict (e.g. a resumed run's saved config)  <  --config a.yaml  <  flags

Unknown keys (in YAML or flags) and ill-typed values are one-line `ConfigError`s that list the
valid keys; ``--print-config`` dumps the resolved YAML (`legolm.config.dump_yaml`). Flags are never
abbreviated (``--optim.l`` is no ``--optim.lr``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

from legolm.config import (
    AUTO,
    coerce,
    config_from_dict,
    config_keys,
    dataclass_fields,
    dump_yaml,
    is_bool,
    is_optional,
    load_yaml,
    merge,
    nested,
    scalar_type,
    type_name,
    unknown_key,
)
from legolm.errors import ConfigError

T = TypeVar("T")
_DEST = "cfg:"  # argparse dest prefix of the dotted flags


def _attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the ``Attributes:`` sections of ``cls`` and its bases (continuation lines joined)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        found = re.findall(r"^ {8}(\w+): (.+(?:\n {12,}\S.*)*)", klass.__doc__ or "", flags=re.MULTILINE)
        docs.update({name: " ".join(text.split()) for name, text in found})
    return docs


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


def add_config_args(parser: argparse.ArgumentParser, cls: type, aliases: dict[str, str] | None = None) -> None:
    """``--config FILE.yaml``, ``--print-config`` and one flag per leaf key of ``cls`` (dotted when nested).

    Args:
        parser: Where to add them (its flags are never abbreviated from here on).
        cls: The config dataclass.
        aliases: Short flat names of dotted keys, e.g. ``{"--data": "data.source", "--overwrite":
            "run.overwrite"}``: each is another name of the key's own flag (``--no-overwrite`` too).
    """
    keys = set(config_keys(cls))
    names: dict[str, list[str]] = {}
    for flag, key in (aliases or {}).items():
        if key not in keys or not flag.startswith("--"):
            raise ValueError(f"alias {flag} -> {key}: not a --flag for a key of {cls.__name__}")
        names.setdefault(key, []).append(flag)
    parser.allow_abbrev = False
    parser.add_argument("--config", action="append", default=[], metavar="FILE.yaml",
                        help="YAML file of config values (repeatable; flags override it)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    _add_section(parser, cls, "", names)
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
        tp = dataclass_fields(sub).get(part, (None, None))[1]
        if not dataclasses.is_dataclass(tp):
            close = difflib.get_close_matches(key, sorted(keys), n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            return ConfigError(f"unknown flag {flag}{hint}; valid sections: {', '.join(_sections(cls))}")
        sub = tp
    return unknown_key(sub, leaf, f"{section}." if section else "")


def _sections(cls: type) -> list[str]:
    return [n for n, (_, tp) in dataclass_fields(cls).items() if dataclasses.is_dataclass(tp)]


def _add_section(parser: argparse.ArgumentParser, cls: type, prefix: str, aliases: dict[str, list[str]]) -> None:
    docs = _attribute_docs(cls)
    group = parser.add_argument_group(prefix.rstrip(".") or cls.__name__)
    nested: list[tuple[str, Any]] = []
    for name, (f, tp) in dataclass_fields(cls).items():
        if dataclasses.is_dataclass(tp):
            nested.append((name, tp))
            continue
        key = prefix + name
        flags = list(dict.fromkeys(["--" + key.replace("_", "-"), "--" + key, *aliases.get(key, [])]))
        default = f.default if f.default is not dataclasses.MISSING else "(see YAML)"
        if not prefix and f.default_factory is not dataclasses.MISSING:  # a section's may be the command's own
            default = f.default_factory()
        kw: dict[str, Any] = dict(dest=_DEST + key, default=argparse.SUPPRESS,
                                  help=f"{docs.get(name, '')} (default: {_shown(default, tp)})")
        if is_bool(tp):
            group.add_argument(*flags, action=OnOffAction, auto=is_optional(tp), **kw)
        elif get_origin(scalar_type(tp)) is list:
            group.add_argument(*flags, action="extend", nargs="+", type=_flag_type(tp, key, list_item=True),
                               metavar="VALUE", **kw)
        else:
            group.add_argument(*flags, type=_flag_type(tp, key), metavar=_metavar(tp), **kw)
    for name, tp in nested:
        _add_section(parser, tp, f"{prefix}{name}.", aliases)


def _shown(default: Any, tp: Any) -> Any:
    """A default as the command line spells it (None of an on/off setting is ``auto``)."""
    return AUTO if default is None and is_bool(tp) else default


def _metavar(tp: Any) -> str:
    inner = scalar_type(tp)
    if get_origin(inner) is typing.Literal:
        return "{" + ",".join(map(str, get_args(inner))) + "}"
    return getattr(inner, "__name__", "VALUE").upper()


def _flag_type(tp: Any, key: str, list_item: bool = False) -> Callable[[str], Any]:
    """argparse ``type=``: the flag's text coerced to ``tp`` (to its items for ``nargs='+'`` lists)."""
    item = get_args(scalar_type(tp))[0] if list_item else tp

    def convert(text: str) -> Any:
        try:
            return coerce(text, item, key)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1]) from None

    convert.__name__ = type_name(item)
    return convert


def cli_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """The dotted flags given on the command line, as a nested dict."""
    return nested((dest[len(_DEST):], value) for dest, value in vars(ns).items() if dest.startswith(_DEST))


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


def printed_config(ns: argparse.Namespace, cfg: Any) -> bool:
    """With ``--print-config``: print the resolved ``cfg`` as YAML and return True (the command stops there)."""
    if ns.print_config:
        print(dump_yaml(cfg), end="")
    return bool(ns.print_config)

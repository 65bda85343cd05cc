"""Dataclass-driven command-line options: a config dataclass's fields are its flags.

``field_name: int = 3`` becomes ``--field-name INT`` (default 3); a ``bool`` becomes a
``--flag / --no-flag`` pair; the field's docstring line (``Attributes:`` section) is its help.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any, TypeVar, get_args, get_origin

T = TypeVar("T")


def _attribute_docs(cls: type) -> dict[str, str]:
    doc = cls.__doc__ or ""
    return dict(re.findall(r"^\s{8}(\w+): (.+)$", doc, flags=re.MULTILINE))


def _scalar_type(tp: Any) -> Any:
    """Strip ``X | None`` to X."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    docs = _attribute_docs(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = _scalar_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f"{docs.get(f.name, '')} (default: {default})"
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif get_origin(tp) is typing.Literal:
            group.add_argument(flag, dest=f.name, choices=get_args(tp), default=default, help=help_)
        else:
            group.add_argument(flag, dest=f.name, type=tp, default=default, help=help_)


def dataclass_from_args(cls: type[T], ns: argparse.Namespace) -> T:
    """Build ``cls`` from the parsed flags that `add_dataclass_args` added."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(ns).items() if k in names})

"""``legolm`` entry point: subcommands, and user errors as one line with exit status 2.

Each subcommand is one module of `legolm.cli` with a ``register(subparsers)`` function; adding a
command is one new file plus one line in `COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from legolm.errors import LegolmError

COMMANDS = [
    "legolm.cli.generate",
    "legolm.cli.export",
    "legolm.cli.analyze",
    "legolm.cli.finetune",
    "legolm.cli.eval",
    "legolm.cli.pretrain",
    "legolm.cli.lego",
    "legolm.cli.lct",
    "legolm.cli.experiment",
    "legolm.cli.serve",
]


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (no usage dump) with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"legolm: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="legolm", description="Small language models, built from bricks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if "RANK" in os.environ:  # under torchrun: rank 0 alone prints
        from legolm.train.distributed import quiet_other_ranks

        quiet_other_ranks()
    args = list(sys.argv[1:] if argv is None else argv)
    bad = next((a for a in args if not _is_utf8(a)), None)
    if bad is not None:
        print(f"legolm: error: the argument {bad.encode('utf-8', 'replace').decode()!r} is not valid UTF-8 text; "
              "pass UTF-8 (e.g. re-save the file it came from as UTF-8)", file=sys.stderr)
        return 2
    from legolm.data.sources import pin_shared_root

    pin_shared_root()
    ns = build_parser().parse_args(args)
    func: Callable[[argparse.Namespace], None] = ns.func
    try:
        func(ns)
        if "RANK" in os.environ:  # under torchrun: all ranks leave the process group together
            from legolm.train.distributed import teardown

            teardown(wait=True)
    except LegolmError as err:
        print(f"legolm: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if not err.filename:  # not about a path the user gave: a bug, keep its traceback
            raise
        print(f"legolm: error: cannot use {err.filename} ({err.strerror}); check the path and its permissions, "
              "or choose another", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("legolm: interrupted", file=sys.stderr)
        return 130
    return 0


def _is_utf8(arg: str) -> bool:
    """Whether a command-line argument decoded cleanly (undecodable bytes arrive as lone surrogates)."""
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())

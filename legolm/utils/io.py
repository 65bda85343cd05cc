"""Atomic writes: outputs appear complete or not at all, and nothing existing is overwritten unasked."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from legolm.errors import LegolmError


def check_writable(path: str | Path, what: str, kind: str = "dir") -> None:
    """Raise `LegolmError` unless ``path`` (a ``dir`` or ``file`` to be written) can be created there.

    Nothing is created: the nearest existing folder must be writable, and an existing ``path`` must
    be of the right kind.

    Args:
        path: Where the output goes.
        what: The flag or setting it came from (named in the error).
        kind: ``dir`` or ``file``.
    """
    target = Path(path).expanduser().absolute()
    if target.exists() and (target.is_dir() != (kind == "dir")):
        other = "a folder" if target.is_dir() else "a file"
        raise LegolmError(f"{what} {path} is {other}, but a {'folder' if kind == 'dir' else 'file'} is written there; "
                          f"choose another {what}")
    folder = next(a for a in (target if target.is_dir() else target.parent, *target.parents) if a.exists())
    if not folder.is_dir():
        raise LegolmError(f"{what} {path} lies under {folder}, which is a file; choose another {what}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LegolmError(f"{what} {path} cannot be written ({folder} is not writable); choose another {what}")


def check_deletable(path: str | Path, inputs: Iterable[str | Path | None], flag: str = "--overwrite") -> None:
    """Raise `LegolmError` if replacing ``path`` would delete the current folder, one above it, or an input.

    Args:
        path: The folder about to be replaced.
        inputs: Paths the same command reads (None and names that are no path are ignored).
        flag: What asked for the replacement (named in the error).
    """
    target = Path(path).resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise LegolmError(f"{flag} would delete {path}, the current directory or one above it; "
                          "choose an output folder below the current one")
    for item in inputs:
        if item is None or not str(item) or not Path(item).expanduser().exists():
            continue
        resolved = Path(item).expanduser().resolve()
        if resolved == target or target in resolved.parents:
            raise LegolmError(f"{flag} would delete {item}, an input of this command inside {path}; "
                              "choose another output folder or move the input out of it")


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``, then ``root`` itself (children before their folder)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(folder)


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` that is renamed to ``target`` on success.

    Before the rename every file written into it, and the directory, is fsync'ed; after it the
    parent directory is, so a power loss leaves either the old ``target`` or the whole new one.

    Raises:
        LegolmError: ``target`` exists and ``overwrite`` is False.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise LegolmError(f"{target} already exists; choose another path, or replace it (overwrite=True; "
                          "--overwrite on the command line)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            fsync_path(target.parent)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
            fsync_path(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, rename it into place, fsync the folder."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_path(path.parent)


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or None when matplotlib (the ``plot`` extra) is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def atomic_savefig(fig: Any, path: str | Path, dpi: int) -> Path:
    """Save a matplotlib figure as PNG through a temporary file beside ``path``, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_json(path: str | Path, expect: type = dict) -> Any:
    """The JSON value in ``path`` (UTF-8), which must be an ``expect`` (dict by default).

    Raises:
        LegolmError: The file cannot be read, is not UTF-8, is not JSON (or nests too deeply), or
            holds another kind of value; one line naming the file.
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise LegolmError(f"cannot read {path} ({err.strerror})") from None
    except UnicodeDecodeError:
        raise LegolmError(f"{path} is not UTF-8 text; it should be a JSON file") from None
    except json.JSONDecodeError as err:
        raise LegolmError(f"{path} is not valid JSON ({err})") from None
    except RecursionError:
        raise LegolmError(f"{path} nests too deeply to be a legolm/Hugging Face JSON file") from None
    if not isinstance(value, expect):
        raise LegolmError(f"{path} must hold a JSON {_JSON_KINDS.get(expect, expect.__name__)}, "
                          f"not {_JSON_KINDS.get(type(value), type(value).__name__)}")
    return value


_JSON_KINDS = {dict: "object", list: "list", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _first_nonfinite(value: Any, where: str) -> str | None:
    """The path (``runs[0].final_val_ppl``) of the first NaN/inf float inside ``value``, else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} = {value}"
    items: Any = ()
    if isinstance(value, dict):
        items = ((f"{where}.{k}" if where else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{where}[{i}]", v) for i, v in enumerate(value))
    for path, item in items:
        found = _first_nonfinite(item, path)
        if found is not None:
            return found
    return None


def finite_json(value: Any, what: str, indent: int | None = None) -> str:
    """``value`` as strict JSON text (one line unless ``indent``), ending in a newline.

    JSON has no NaN or infinity (Python would write a bare ``NaN``, which other readers refuse), so
    a non-finite number is a `LegolmError` naming where it is instead.

    Args:
        value: Dicts, lists, strings and numbers (other objects are written as ``str``).
        what: The file or result being written (named in the error).
        indent: Passed to `json.dumps`.
    """
    found = _first_nonfinite(value, "")
    if found is not None:
        raise LegolmError(f"{what} would hold a non-finite number ({found}), which JSON cannot store; the run "
                          "produced NaN/inf results: check its metrics and settings (e.g. a lower learning rate)")
    return json.dumps(value, indent=indent, default=str, allow_nan=False) + "\n"

"""Run directories: checked before anything is written, marked as legolm's, locked while in use.

::

    <out_dir>/
        .legolm-run     marker: this directory was made by legolm (only such directories are --overwrite'n)
        .legolm-lock    fcntl.flock'ed by the process that uses the run; holds its PID

Rules, all checked by `check_run_dir` before a command writes anything:

* an existing directory needs ``--overwrite`` (replace) or ``--resume`` (continue);
* a non-empty directory is only replaced or continued when it carries the marker, so
  ``--overwrite`` never deletes a folder legolm did not make;
* ``--overwrite`` never deletes the current directory or one above it, nor a directory that holds
  an input of the same command (the base model, the data, the tokenizer, a cache);
* a directory another process holds the lock of is refused, naming that process's PID.

`open_run_dir` then creates (or empties) the directory, writes the marker and takes the lock;
the lock is held until `release_run_dir` (or the end of the process). A process may open the
same directory again (a command around `fit`): it is not checked again, and the lock is counted,
not taken twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from legolm.errors import LegolmError
from legolm.utils.io import atomic_write_text, check_deletable, check_writable

MARKER = ".legolm-run"
LOCK = ".legolm-lock"
MARKER_TEXT = "legolm run directory (--overwrite may replace it)\n"
PID_BYTES = 32  # the most of the lock file read back for the holder's PID


@dataclass
class _Held:
    fd: int
    count: int


_HELD: dict[Path, _Held] = {}  # resolved run directory -> this process's lock on it


def check_run_dir(out_dir: str | Path, overwrite: bool, resume: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse a run directory that this run may not use (no side effects; see the module docstring).

    Args:
        out_dir: The run directory.
        overwrite: The run replaces an existing directory.
        resume: The run continues an existing directory.
        inputs: Paths the command reads (None and names that are no path are ignored); ``--overwrite``
            refuses a directory that holds one.

    Raises:
        LegolmError: One line naming the problem and the fix.
    """
    path = Path(out_dir)
    if path.resolve() in _HELD:  # this process opened (and checked) it already
        return
    check_writable(path, "--run.out-dir")
    if not path.exists():
        return
    if not path.is_dir():
        raise LegolmError(f"run directory {path} exists and is not a directory; choose another --run.out-dir")
    if not (overwrite or resume):
        raise LegolmError(f"run directory {path} already exists; pass --overwrite to replace it, "
                          "--resume to continue it, or choose another --run.out-dir")
    if overwrite:
        check_deletable(path, inputs)
    _check_ours(path, "--overwrite" if overwrite else "--resume")
    _check_unlocked(path)


def _check_ours(path: Path, flag: str) -> None:
    """A non-empty directory must carry legolm's marker."""
    if (path / MARKER).is_file() or not any(path.iterdir()):
        return
    raise LegolmError(f"{path} is not a legolm run directory (it has no {MARKER} file), so {flag} will not touch "
                      f"it; choose another --run.out-dir (if it is a run of an older legolm, create {path / MARKER})")


def _check_unlocked(path: Path) -> None:
    """Refuse a directory whose lock another process holds."""
    lock = path / LOCK
    if not lock.is_file():
        return
    fd = _open_lock(lock, os.O_RDONLY)
    try:
        _try_lock(fd, path)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_lock(lock: Path, flags: int) -> int:
    try:
        return os.open(lock, flags | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise LegolmError(f"cannot open the lock file {lock} ({err.strerror}); check the run directory's "
                          "permissions or choose another --run.out-dir") from None


def _try_lock(fd: int, path: Path) -> None:
    """Take the exclusive lock without waiting, else raise naming the holder's PID."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, PID_BYTES, 0).decode(errors="replace").strip() or "unknown"
        raise LegolmError(f"run directory {path} is in use by another legolm process (PID {holder}); wait for it "
                          "to finish or stop it, or choose another --run.out-dir") from None


def _lock(path: Path) -> int:
    """Lock ``path`` for this process and write its PID into the lock file; return the descriptor."""
    fd = _open_lock(path / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        _try_lock(fd, path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _clear(path: Path) -> None:
    """Delete everything in ``path`` but its lock file (links are removed, not followed)."""
    for entry in path.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def open_run_dir(out_dir: str | Path, overwrite: bool, resume: bool,
                 inputs: Iterable[str | Path | None] = ()) -> Path:
    """`check_run_dir`, then create or empty (``overwrite``) or keep (``resume``) the run directory, mark and lock it.

    Returns:
        The run directory. Call `release_run_dir` when done (or use `hold_run_dir`).
    """
    check_run_dir(out_dir, overwrite, resume, inputs)
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LegolmError(f"cannot create run directory {path} ({err.strerror}); "
                          "choose another --run.out-dir") from None
    key = path.resolve()
    held = _HELD.get(key)
    if held is None:
        held = _HELD[key] = _Held(_lock(path), 0)
    held.count += 1
    try:
        if overwrite:
            _clear(path)
        if not (path / MARKER).is_file():
            atomic_write_text(path / MARKER, MARKER_TEXT)
    except BaseException:
        release_run_dir(path)
        raise
    return path


def release_run_dir(out_dir: str | Path) -> None:
    """Undo one `open_run_dir` of this process; the last one unlocks the directory."""
    key = Path(out_dir).resolve()
    held = _HELD.get(key)
    if held is None:
        return
    held.count -= 1
    if held.count <= 0:
        del _HELD[key]
        fcntl.flock(held.fd, fcntl.LOCK_UN)
        os.close(held.fd)


@contextlib.contextmanager
def hold_run_dir(out_dir: str | Path, overwrite: bool, resume: bool,
                 inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """`open_run_dir` for the duration of a ``with`` block (a whole command: training, saving, reporting)."""
    path = open_run_dir(out_dir, overwrite, resume, inputs)
    try:
        yield path
    finally:
        release_run_dir(path)

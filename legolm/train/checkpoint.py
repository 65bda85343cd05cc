"""Training checkpoints: everything a run needs to continue bit for bit, written atomically and durably.

::

    <out_dir>/checkpoints/step-00000200/
        model.safetensors     every model tensor (shared ones once)
        optimizer.pt          optimizer state keyed by parameter name (whole tensors, any world size),
                              read back with torch.load(weights_only=True)
        rng.pt                torch (and CUDA) generator states, same
        trainer.json          step, epoch, data position, best metric, early-stopping count,
                              tokens, elapsed time, Python and NumPy RNG states

Each checkpoint is written into a temporary directory whose files are fsync'ed and which is then
renamed into place, so a process killed mid-write (or a power loss) leaves the previous checkpoint
intact (and a ``.step-*.tmp-*`` directory that the next resume deletes). On resume an unreadable
newest checkpoint (a damaged disk, a file truncated by hand) is set aside and the previous one used.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from legolm.errors import CheckpointError
from legolm.train.run_dir import check_run_dir as check_run_dir  # re-exported: they lived here before run_dir.py
from legolm.train.run_dir import open_run_dir as open_run_dir
from legolm.utils.io import atomic_dir

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
STEP_DIR = re.compile(rf"{PREFIX}(\d+)")
CORRUPT_SUFFIX = ".unreadable"  # an unreadable checkpoint is renamed .step-<N>.unreadable (kept, out of the way)
SAFETENSORS_HEADER_BYTES = 8  # a safetensors file starts with its header's length, a little-endian u64


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``checkpoints/step-<N>`` folder, oldest first (stray names are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint of the highest step in ``run_dir``, if any (see `load_latest_checkpoint` for a readable one)."""
    found = checkpoint_dirs(run_dir)
    return found[-1][1] if found else None


def remove_partial_checkpoints(run_dir: str | Path) -> None:
    """Delete the temporary folders of checkpoint writes cut short by a kill."""
    for leftover in (Path(run_dir) / CHECKPOINTS).glob(f".{PREFIX}*.tmp-*"):
        shutil.rmtree(leftover)


def _rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON part, tensor part) of every generator's state."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    as_json = {"python": random.getstate(),
               "numpy": [kind, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(gauss)]}
    tensors: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return as_json, tensors


def _set_rng_state(as_json: dict[str, Any], tensors: dict[str, Any]) -> None:
    version, internal, gauss = as_json["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = as_json["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def save_training_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer_state: dict[str, Any],
                             trainer_state: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step-<step>`` atomically and delete all but the newest ``keep``.

    Args:
        run_dir: The run directory.
        step: Optimizer steps done.
        model: A plain module holding the full weights (FSDP2: consolidated first).
        optimizer_state: The optimizer state keyed by parameter name (see `Wrapped.optimizer_state`).
        trainer_state: Loop state and data position (JSON-serialisable).
        keep: Checkpoints to keep.
    """
    root = Path(run_dir) / CHECKPOINTS
    target = root / f"{PREFIX}{step:08d}"
    rng_json, rng_tensors = _rng_state()
    with atomic_dir(target, overwrite=True) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng_tensors, tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "rng": rng_json}) + "\n")
    for _, old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old)
    return target


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint whose files are missing, truncated or garbage (as opposed to one of another model)."""


def _check_safetensors(path: Path) -> dict[str, Any]:
    """``path``'s safetensors header; raise ``ValueError`` unless the file is as long as it says (a torn write is
    not)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(SAFETENSORS_HEADER_BYTES)
        n = int.from_bytes(head, "little") if len(head) == SAFETENSORS_HEADER_BYTES else size
        if n > size - SAFETENSORS_HEADER_BYTES:
            raise ValueError(f"model.safetensors is truncated ({size} bytes)")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("model.safetensors has no tensor header")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = SAFETENSORS_HEADER_BYTES + n + max(ends, default=0)
    if expected != size:
        raise ValueError(f"model.safetensors holds {size} bytes, its header describes {expected}")
    return header


def read_training_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(trainer state, optimizer state, RNG tensors) of the checkpoint at ``path``, every file checked.

    Raises:
        UnreadableCheckpoint: A file is missing, truncated or not what it should be.
    """
    try:
        _check_safetensors(path / "model.safetensors")
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng_tensors = torch.load(path / "rng.pt", weights_only=True)
        trainer = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
        if not (isinstance(trainer, dict) and {"fit", "data", "rng"} <= trainer.keys()):
            raise ValueError("trainer.json lacks fit/data/rng")
    except Exception as err:  # any failure to read means the same: unreadable
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableCheckpoint(f"checkpoint {path} is unreadable ({first})") from None
    return trainer, optimizer_state, rng_tensors


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a mismatched checkpoint into one `CheckpointError` line."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # safetensors raises its own error type
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot resume from {path} ({first}); resume with the settings it was written "
                              "with, or start again with --overwrite") from None


def load_training_checkpoint(path: Path, model: nn.Module, device: torch.device) -> tuple[dict[str, Any],
                                                                                          dict[str, Any]]:
    """Restore the model weights and RNG states from ``path``; return (trainer state, optimizer state).

    The optimizer state is keyed by parameter name; load it with `Wrapped.load_optimizer_state`
    once the optimizer exists.

    Raises:
        UnreadableCheckpoint: A file is missing or torn. CheckpointError: The checkpoint is of another model.
    """
    state, optimizer_state, rng_tensors = read_training_checkpoint(path)
    _check_same_model(path, model)
    with _reading(path):
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=str(device))
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
                                  f"unexpected {sorted(unexpected)[:5]}; resume with the config it was written with")
        _set_rng_state(state.pop("rng"), rng_tensors)
    return state, optimizer_state


def _check_same_model(path: Path, model: nn.Module) -> None:
    """Raise `CheckpointError` when a weight of the checkpoint at ``path`` has another shape than ``model``'s
    (another width, depth of a layer, or vocabulary: a different tokenizer), from the header alone."""
    header = _check_safetensors(path / "model.safetensors")
    for key, tensor in model.state_dict().items():
        saved = header.get(key)
        if isinstance(saved, dict) and list(saved.get("shape", ())) != list(tensor.shape):
            there, here = ("x".join(map(str, s)) for s in (saved["shape"], tensor.shape))
            raise CheckpointError(f"cannot resume: checkpoint {path} is of another model ({key} is {there} there, "
                                  f"{here} here: another model setting or tokenizer vocabulary); resume with the run's "
                                  "own model and data settings (its config.yaml) or start a new run")


Saved = tuple[dict[str, Any], dict[str, Any]]  # (trainer state, optimizer state)


def load_latest_checkpoint(run_dir: Path, model: nn.Module, device: torch.device, say: Callable[[str], None],
                           set_aside: bool = True) -> tuple[Path | None, Saved | None]:
    """Load the newest readable checkpoint of ``run_dir`` (see `load_training_checkpoint`).

    Unreadable newer ones (a torn or damaged write) are renamed ``.step-<N>.unreadable`` (with
    ``set_aside``: one process of a job does it) and the previous one is used, saying so through ``say``.

    Returns:
        (its path, (trainer state, optimizer state)), or (None, None) when there is no checkpoint.

    Raises:
        CheckpointError: Checkpoints exist but none is readable, or they are of another model.
    """
    found = checkpoint_dirs(run_dir)
    bad: list[tuple[Path, str]] = []
    for _, path in reversed(found):
        try:
            saved = load_training_checkpoint(path, model, device)
        except UnreadableCheckpoint as err:
            bad.append((path, str(err)))
            continue
        for broken, reason in bad:
            aside = _free_name(broken.with_name(f".{broken.name}{CORRUPT_SUFFIX}"))
            if set_aside:
                broken.rename(aside)
            say(f"warning: {reason}; moved it to {aside} and resumed from the previous checkpoint {path.name}")
        return path, saved
    if bad:
        raise CheckpointError(f"no readable checkpoint in {Path(run_dir) / CHECKPOINTS}: {bad[0][1]}; start again "
                              "with --overwrite (or delete the damaged checkpoints)")
    return None, None


def _free_name(path: Path) -> Path:
    """``path``, or ``path-1``, ``path-2``, ... : the first that does not exist."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def load_optimizer_checkpoint(path: Path, load: Callable[[dict[str, Any]], None], state: dict[str, Any]) -> None:
    """``load(state)`` (an optimizer state from `load_training_checkpoint`), errors as one `CheckpointError` line."""
    with _reading(path):
        load(state)

"""Training checkpoints: everything a run needs to continue bit for bit, written atomically.

::

    <out_dir>/checkpoints/step-00000200/
        model.safetensors     every model tensor (shared ones once)
        optimizer.pt          optimizer state keyed by parameter name (whole tensors, any world size),
                              read back with torch.load(weights_only=True)
        rng.pt                torch (and CUDA) generator states, same
        trainer.json          step, epoch, data position, best metric, early-stopping count,
                              tokens, elapsed time, Python and NumPy RNG states

Each checkpoint is written into a temporary directory that is renamed into place, so a process
killed mid-write leaves the previous checkpoint intact (and a ``.step-*.tmp-*`` directory that
the next resume deletes).
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from legolm.errors import CheckpointError, LegolmError
from legolm.utils.io import atomic_dir

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


def check_run_dir(out_dir: str | Path, overwrite: bool, resume: bool) -> None:
    """Refuse an existing run directory unless asked to overwrite or resume it (no side effects)."""
    path = Path(out_dir)
    if path.exists() and not (overwrite or resume):
        raise LegolmError(f"run directory {path} already exists; pass --overwrite to replace it, "
                          "--resume to continue it, or choose another --run.out-dir")
    if path.exists() and not path.is_dir():
        raise LegolmError(f"run directory {path} exists and is not a directory; choose another --run.out-dir")


def open_run_dir(out_dir: str | Path, overwrite: bool, resume: bool) -> Path:
    """Create the run directory (replacing it with ``overwrite``, keeping it with ``resume``)."""
    check_run_dir(out_dir, overwrite, resume)
    path = Path(out_dir)
    if path.exists() and overwrite:
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
        shutil.rmtree(old)
    path.mkdir(parents=True, exist_ok=True)
    for leftover in (path / CHECKPOINTS).glob(f".{PREFIX}*.tmp-*"):  # a write cut short by a kill
        shutil.rmtree(leftover)
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint of the highest step in ``run_dir``, if any."""
    found = sorted((Path(run_dir) / CHECKPOINTS).glob(f"{PREFIX}*"), key=lambda p: int(p.name[len(PREFIX):]))
    return found[-1] if found else None


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
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old)
    return target


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn a broken or mismatched checkpoint into one `CheckpointError` line."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot resume from {path} ({first}); delete it to fall back to an older one") from None


def load_training_checkpoint(path: Path, model: nn.Module, device: torch.device) -> tuple[dict[str, Any],
                                                                                          dict[str, Any]]:
    """Restore the model weights and RNG states from ``path``; return (trainer state, optimizer state).

    The optimizer state is keyed by parameter name; load it with `Wrapped.load_optimizer_state`
    once the optimizer exists.
    """
    with _reading(path):
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=str(device))
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {path} does not match the model: missing {sorted(missing)[:5]}, "
                                  f"unexpected {sorted(unexpected)[:5]}; resume with the config it was written with")
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng_tensors = torch.load(path / "rng.pt", weights_only=True)
        state: dict[str, Any] = json.loads((path / "trainer.json").read_text())
    _set_rng_state(state.pop("rng"), rng_tensors)
    return state, optimizer_state


def load_optimizer_checkpoint(path: Path, load: Callable[[dict[str, Any]], None], state: dict[str, Any]) -> None:
    """``load(state)`` (an optimizer state from `load_training_checkpoint`), errors as one `CheckpointError` line."""
    with _reading(path):
        load(state)

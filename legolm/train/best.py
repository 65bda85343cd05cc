"""`eval.keep_best`: the trainable weights of the best validation evaluation, restored when training ends.

What Hugging Face's ``load_best_model_at_end`` does, for the parameters `fit` trains (frozen ones never
change). The snapshot lives in CPU memory and, for resumed runs, in ``<run_dir>/best.safetensors``
(written atomically by rank 0, with the step and perplexity in its metadata).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from legolm.utils.io import fsync_path

BEST_FILE = "best.safetensors"


class BestWeights:
    """The trainable parameters of the best evaluation so far, with its step and validation perplexity."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.step, self.val_ppl = -1, float("inf")

    @staticmethod
    def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def snapshot(self, model: nn.Module, step: int, val_ppl: float) -> None:
        self.tensors = {n: p.detach().to("cpu", copy=True) for n, p in self.trainable(model).items()}
        self.step, self.val_ppl = step, val_ppl

    @torch.no_grad()
    def restore(self, model: nn.Module) -> bool:
        """Copy the snapshot into ``model``'s trainable parameters; False when there is none."""
        if not self.tensors:
            return False
        for name, p in self.trainable(model).items():
            p.copy_(self.tensors[name].to(p.device))
        return True

    def save(self, run_dir: Path) -> None:
        path, tmp = run_dir / BEST_FILE, run_dir / (BEST_FILE + ".tmp")
        save_file({n: t.contiguous() for n, t in self.tensors.items()}, str(tmp),
                  metadata={"step": str(self.step), "val_ppl": repr(self.val_ppl)})
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(run_dir)

    @classmethod
    def load(cls, run_dir: Path) -> BestWeights:
        """The snapshot a run directory keeps (an empty one when it has none)."""
        best, path = cls(), run_dir / BEST_FILE
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            best.tensors = load_file(str(path))
            best.step, best.val_ppl = int(meta["step"]), float(meta["val_ppl"])
        return best

"""Helpers the GPU benchmarks share, checked on CPU (a hang here once cost a GPU run)."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.common import cycled
from legolm.train.batches import WindowBatches


def test_cycled_goes_through_epochs_instead_of_hanging() -> None:
    ids = np.arange(3 * 2 * 8 + 1, dtype=np.uint16)  # 6 windows of 8: 3 batches of 2 per epoch
    source = WindowBatches(ids, 8, 2, shuffle=True, seed=0)
    out = cycled(source, 7, torch.device("cpu"))
    assert len(out) == 7 and source.epoch == 2
    first_epoch = sorted(int(s) for b in out[:3] for s in b["sample_ids"])
    assert first_epoch == list(range(6))  # every window once per epoch
    assert not all(torch.equal(a["sample_ids"], b["sample_ids"]) for a, b in zip(out[:3], out[3:6], strict=True))

"""Hand-written GPU kernels (Triton, an optional dependency: ``pip install 'legolm[kernels]'``).

Importing this package does not import Triton; `legolm.kernels.decode` does.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, used by the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` here (None when they can), with the way to make them run:
    not installed, or neither a CUDA device nor Triton's interpreter."""
    if importlib.util.find_spec("triton") is None:
        return "needs Triton (pip install 'legolm[kernels]')"
    if device.type != "cuda" and not interpreted():
        return f"runs on a CUDA GPU, not {device.type} (TRITON_INTERPRET=1 runs it slowly on the CPU)"
    return None

"""Hand-written GPU kernels (Triton, an optional dependency: ``pip install 'legolm[kernels]'``).

Importing this package does not import Triton; `legolm.kernels.decode` does.
"""

from __future__ import annotations

import os


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, used by the tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

"""Arithmetic that reports ``inf`` where the true value is infinite instead of raising ``OverflowError``."""

from __future__ import annotations

import math

MAX_EXP_ARG = math.log(1.7976931348623157e308)  # log of the largest float64: exp() overflows above it


def safe_exp(x: float) -> float:
    """``math.exp(x)``, but ``inf`` where that overflows (NaN stays NaN)."""
    return math.inf if x > MAX_EXP_ARG else math.exp(x)

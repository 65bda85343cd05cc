"""Perplexity arithmetic is finite-safe: ``exp`` of a mean NLL past ~709 is ``inf``, never an OverflowError."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import legolm
from legolm.lego.evaluate import TokenScores
from legolm.utils.finite import safe_exp


def test_safe_exp_is_exp_below_the_overflow_and_inf_above() -> None:
    assert safe_exp(709.0) == math.exp(709.0) and safe_exp(-1e9) == 0.0
    assert safe_exp(710.0) == math.inf and safe_exp(1e300) == math.inf and safe_exp(math.inf) == math.inf
    assert math.isnan(safe_exp(math.nan))
    with pytest.raises(OverflowError):  # what the perplexities used to call
        math.exp(710.0)


def test_lego_perplexities_past_the_overflow_are_inf() -> None:
    n = 64
    logp = torch.full((n,), -800.0)
    scores = TokenScores(logp, logp, torch.linspace(0, 1, n))
    assert scores.shallow_ppl() == scores.deep_ppl() == math.inf
    assert scores.routed_ppl(0.5, 0.1) == scores.hard_routed_ppl(0.5) == math.inf
    assert TokenScores(-torch.ones(n), -torch.ones(n), torch.zeros(n)).deep_ppl() == pytest.approx(math.e)


def test_no_bare_math_exp_in_the_package() -> None:
    """Every exp of a loss goes through `safe_exp` (the one place that calls math.exp)."""
    root = Path(legolm.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        if path == root / "utils" / "finite.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "exp" and isinstance(node.value, ast.Name) \
                    and node.value.id == "math":
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert found == []

"""Evaluation: perplexity with sliding or disjoint windows, and the sanity check of a perplexity."""

from legolm.eval.perplexity import PPLResult, disjoint_ppl, sliding_window_ppl, windows
from legolm.eval.sanity import PPLBands, PPLVerdict

__all__ = ["PPLBands", "PPLResult", "PPLVerdict", "disjoint_ppl", "sliding_window_ppl", "windows"]

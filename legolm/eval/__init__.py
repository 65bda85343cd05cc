"""Evaluation: perplexity with sliding or disjoint windows."""

from legolm.eval.perplexity import PPLResult, disjoint_ppl, sliding_window_ppl, windows

__all__ = ["PPLResult", "disjoint_ppl", "sliding_window_ppl", "windows"]

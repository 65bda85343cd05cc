"""One sanity check for every perplexity a command prints, with one wording.

The bands of the design guidelines for a small language model on held-out real text::

    ppl < 5            suspicious: leakage (evaluated text seen in training, repeated text) or a bug
    5 <= ppl <= 30     normal for a trained small model
    30 < ppl <= 1000   high (the guidelines give no verdict here: undertrained, too small, off-domain)
    ppl > 1000         not learning

and one more rule for "not learning" that holds at any vocabulary size: a perplexity at or above
the vocabulary size V is no better than a uniform guess over V tokens (exp(ln V) = V), which an
untrained model reaches. The bands assume a subword vocabulary (thousands of tokens); with a
character-level vocabulary of tens of symbols a trained model sits below 5. The thresholds are
settings (`PPLBands`: ``eval.ppl_bands`` of the training commands, ``ppl_bands`` of ``legolm eval ppl``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from legolm.errors import ConfigError

Band = Literal["suspicious", "normal", "high", "not_learning"]
WARN: tuple[Band, ...] = ("suspicious", "not_learning")


@dataclass(frozen=True)
class PPLVerdict:
    """The band a perplexity falls in, and the line that says so.

    Attributes:
        label: What was measured (e.g. "held-out").
        ppl: The perplexity.
        band: suspicious, normal, high or not_learning.
        message: The one line printed for it.
    """

    label: str
    ppl: float
    band: Band
    message: str

    @property
    def warns(self) -> bool:
        """Suspicious or not learning: something is probably wrong."""
        return self.band in WARN

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PPLBands:
    """Perplexity bands of the sanity check printed under every perplexity.

    Attributes:
        suspicious_below: Below this a held-out perplexity is suspicious (leakage or a bug).
        normal_up_to: Up to this (from suspicious_below) it is normal for a trained small model.
        not_learning_above: Above this the model is not learning.
        uniform_is_not_learning: Also call a perplexity at or above the vocabulary size (a uniform guess) not learning.
    """

    suspicious_below: float = 5.0
    normal_up_to: float = 30.0
    not_learning_above: float = 1000.0
    uniform_is_not_learning: bool = True

    def validate(self, prefix: str = "") -> None:
        """Raise `ConfigError` unless 0 < suspicious_below <= normal_up_to <= not_learning_above."""
        if not 0 < self.suspicious_below <= self.normal_up_to <= self.not_learning_above:
            raise ConfigError(f"{prefix}suspicious_below, normal_up_to and not_learning_above must satisfy "
                              f"0 < {self.suspicious_below:g} <= {self.normal_up_to:g} <= "
                              f"{self.not_learning_above:g}")

    def check(self, label: str, ppl: float, vocab_size: int | None = None) -> PPLVerdict:
        """The band of ``ppl`` (``label`` names it in the message; ``vocab_size`` enables the uniform rule)."""
        text = f"ppl check: {label} perplexity {_fmt(ppl)}"
        advice = "check the learning rate, the data and the labels"
        if not math.isfinite(ppl):
            return PPLVerdict(label, ppl, "not_learning", f"{text} is not finite -> not learning (diverged): {advice}")
        if ppl > self.not_learning_above:
            return PPLVerdict(label, ppl, "not_learning", f"{text} > {self.not_learning_above:g} -> not learning: "
                                                          f"{advice}")
        if self.uniform_is_not_learning and vocab_size and ppl >= vocab_size:
            return PPLVerdict(label, ppl, "not_learning", f"{text} >= the vocabulary size {vocab_size:,} (a uniform "
                                                          f"guess) -> not learning: {advice}")
        if ppl < self.suspicious_below:
            return PPLVerdict(label, ppl, "suspicious", f"{text} < {self.suspicious_below:g} -> suspicious: leakage "
                              "(evaluated text seen in training, repeated text) or a bug (attention that sees the "
                              "future, labels not shifted)")
        if ppl <= self.normal_up_to:
            return PPLVerdict(label, ppl, "normal", f"{text} in {self.suspicious_below:g}-{self.normal_up_to:g} -> "
                                                    "normal for a trained small model")
        return PPLVerdict(label, ppl, "high", f"{text} in {self.normal_up_to:g}-{self.not_learning_above:g} -> high: "
                                              "undertrained, too small for the data, or off-domain text")

    def lines(self, ppls: dict[str, float], vocab_size: int | None = None) -> str:
        """One `check` line per labelled perplexity."""
        return "\n".join(self.check(label, ppl, vocab_size).message for label, ppl in ppls.items())


def _fmt(ppl: float) -> str:
    return f"{ppl:.3g}" if math.isfinite(ppl) and ppl >= 1e6 else f"{ppl:,.2f}"

"""The shared perplexity sanity check: the guidelines' bands at their edges, the uniform-guess rule
(checked on a model whose logits are all zero), settings and their errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import legolm
from legolm.errors import ConfigError
from legolm.eval import sliding_window_ppl
from legolm.eval.sanity import PPLBands


@pytest.mark.parametrize(("ppl", "band"), [
    (1.0, "suspicious"), (4.99, "suspicious"), (5.0, "normal"), (24.25, "normal"), (30.0, "normal"),
    (30.01, "high"), (418.1, "high"), (1000.0, "high"), (1000.01, "not_learning"), (4.0e7, "not_learning"),
    (math.inf, "not_learning"), (math.nan, "not_learning"),
])
def test_bands_of_the_guidelines(ppl: float, band: str) -> None:
    verdict = PPLBands().check("held-out", ppl)
    assert verdict.band == band and verdict.warns == (band in ("suspicious", "not_learning"))
    assert verdict.message.startswith("ppl check: held-out perplexity ") and "\n" not in verdict.message


def test_one_wording_per_band() -> None:
    bands = PPLBands()
    assert bands.check("val", 3.0).message == (
        "ppl check: val perplexity 3.00 < 5 -> suspicious: leakage (evaluated text seen in training, repeated "
        "text) or a bug (attention that sees the future, labels not shifted)")
    assert bands.check("val", 24.25).message == "ppl check: val perplexity 24.25 in 5-30 -> normal for a trained " \
                                                "small model"
    assert bands.check("val", 41.96).message == "ppl check: val perplexity 41.96 in 30-1000 -> high: undertrained, " \
                                                "too small for the data, or off-domain text"
    assert bands.check("val", 4.0e7).message == "ppl check: val perplexity 4e+07 > 1000 -> not learning: check the " \
                                                "learning rate, the data and the labels"
    assert bands.lines({"a": 3.0, "b": 24.25}).splitlines() == [bands.check("a", 3.0).message,
                                                                bands.check("b", 24.25).message]


def test_a_uniform_guess_is_not_learning_at_any_vocabulary() -> None:
    """All-zero logits give every token 1/V: perplexity exactly V (here 512, inside the 'high' band)."""
    model = legolm.TransformerLM(legolm.ModelConfig.from_name("tiny-gpt2")).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: the embedding too; logits are 0 whatever the input
    ids = np.random.default_rng(0).integers(0, 512, 300)
    result = sliding_window_ppl(model, ids, 64, 32, progress=False)
    assert result.ppl == pytest.approx(512.0, rel=1e-5)
    verdict = PPLBands().check("held-out", result.ppl, vocab_size=512)
    assert verdict.band == "not_learning" and "vocabulary size 512 (a uniform guess)" in verdict.message
    assert PPLBands().check("held-out", 511.0, vocab_size=512).band == "high"
    assert PPLBands(uniform_is_not_learning=False).check("held-out", result.ppl, vocab_size=512).band == "high"


def test_bands_are_settings_and_checked() -> None:
    char_level = PPLBands(suspicious_below=1.5, normal_up_to=4.0, not_learning_above=60.0)
    assert char_level.check("val", 3.2).band == "normal" and char_level.check("val", 1.2).band == "suspicious"
    with pytest.raises(ConfigError, match="0 < 5 <= 2 <= 1000"):
        PPLBands(normal_up_to=2.0).validate()
    with pytest.raises(ConfigError, match="must satisfy 0 < 0"):
        PPLBands(suspicious_below=0.0).validate()

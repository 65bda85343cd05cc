"""LayerSkip-style phase 1 of a pretrained split (`lego.joint_exit_weight`): the model trains with its exits."""

from __future__ import annotations

import pytest
import torch

from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.lego.config import LegoConfig, LegoSettings
from legolm.lego.split import ExitProbe, ExitProbeLoss, measure_splits
from legolm.model.transformer import TransformerLM
from legolm.train.config import ModelSpec
from legolm.train.head_loss import token_cross_entropy


def _probe(train_model: bool) -> ExitProbe:
    torch.manual_seed(0)
    return ExitProbe(TransformerLM(ModelConfig.from_name("tiny-pythia", layers=["pythia"] * 4)), [1, 2],
                     train_model=train_model)


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "labels": torch.roll(ids, -1, 1)}


def test_the_joint_loss_is_the_deep_loss_plus_the_weighted_mean_of_the_exits() -> None:
    """By hand: CE of the model's own logits + w · mean of the two exits' CE; gradients reach every block.
    Without joint training only the exits' mean, and no block gets a gradient."""
    for train_model in (True, False):
        probe = _probe(train_model)
        batch = _batch(probe.model.config.vocab_size)
        labels = batch["labels"]
        loss, n, parts = ExitProbeLoss(0.5)(probe, batch)
        with torch.no_grad():
            hidden = probe.hidden(batch["input_ids"])
            exits = torch.stack([token_cross_entropy(probe.exit(k)(h), labels) for k, h in hidden.items()]).mean()
            deep = token_cross_entropy(probe.model(batch["input_ids"]), labels)
        want = deep + 0.5 * exits if train_model else exits
        torch.testing.assert_close(loss.detach(), want)
        assert n == labels.numel()
        loss.backward()
        block_grads = [p.grad for p in probe.model.blocks.parameters()]
        if train_model:
            torch.testing.assert_close(parts["deep"], deep)
            assert all(g is not None and g.abs().sum() > 0 for g in block_grads)
        else:
            assert parts == {} and all(g is None for g in block_grads)
        assert all(p.grad is not None for p in probe.exits.parameters() if p.requires_grad)


def test_the_tolerance_is_relative_to_the_unmodified_model() -> None:
    """The same probe measured with a reference far above or far below its own full-depth perplexity: every
    candidate within tolerance, or none; the points carry the reference and their own full perplexity."""
    probe = _probe(True).eval()
    batches = [_batch(probe.model.config.vocab_size) for _ in range(2)]
    settings = LegoSettings(split_candidates=[1, 2], calibrate="ratio", target_ratio=0.5)
    own = measure_splits(probe, batches, settings)
    assert all(p.reference_ppl == p.full_ppl for p in own)
    high = measure_splits(probe, batches, settings, reference_ppl=1e9)
    low = measure_splits(probe, batches, settings, reference_ppl=1e-3)
    assert all(p.within_tolerance and p.reference_ppl == 1e9 for p in high)
    assert not any(p.within_tolerance for p in low)
    assert [p.full_ppl for p in high] == [p.full_ppl for p in own]


def test_joint_exit_weight_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"lego\.joint_exit_weight must be >= 0"):
        LegoConfig(model=ModelSpec(init="some/base"),
                   lego=LegoSettings(split_candidates=[2], joint_exit_weight=-1.0)).validate()
    with pytest.raises(ConfigError, match=r"--lego\.split-candidates K\) or set lego\.joint_exit_weight 0"):
        LegoConfig(model=ModelSpec(init="some/base"), lego=LegoSettings(split=2, joint_exit_weight=0.5)).validate()


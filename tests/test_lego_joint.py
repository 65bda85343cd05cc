"""LayerSkip-style phase 1 of a pretrained split (`lego.joint_exit_weight`): the model trains with its exits."""

from __future__ import annotations

import pytest
import torch

from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.lego.config import LegoConfig, LegoSettings
from legolm.lego.split import ExitProbe, ExitProbeLoss, measure_splits
from legolm.model.transformer import TransformerLM
from legolm.train.config import ModelSpec, OptimConfig, ScheduleConfig
from legolm.train.head_loss import token_cross_entropy
from legolm.train.optim import LRSchedule, build_optimizer, lr_scales


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
    with pytest.raises(ConfigError, match=r"lego\.exit_lr_scale must be > 0"):
        LegoConfig(model=ModelSpec(init="some/base"),
                   lego=LegoSettings(split_candidates=[2], joint_exit_weight=0.5, exit_lr_scale=0.0)).validate()
    with pytest.raises(ConfigError, match=r"lego\.joint_exit_weight > 0: set that, or leave lego\.exit_lr_scale 1"):
        LegoConfig(model=ModelSpec(init="some/base"),
                   lego=LegoSettings(split_candidates=[2], exit_lr_scale=10.0)).validate()


def test_the_exits_own_parameters_train_at_their_scaled_rate_and_the_model_at_the_schedules() -> None:
    """One SGD-like step of Adam moves each parameter by about its group's rate: the lenses and norms by 10x
    the blocks' rate; the shared head (the model's, frozen) carries no scale."""
    torch.manual_seed(0)
    probe = ExitProbe(TransformerLM(ModelConfig.from_name("tiny-pythia", layers=["pythia"] * 4)), [1, 2],
                      train_model=True, exit_lr_scale=10.0)
    own = [p for e in probe.exits.values() for p in (*e.lens.parameters(), *e.norm.parameters())]  # type: ignore[union-attr]
    assert lr_scales(own) == [10.0] * len(own)
    assert set(lr_scales(probe.model.parameters())) == {1.0}
    params = [p for p in probe.parameters() if p.requires_grad]
    opt = build_optimizer(params, OptimConfig(lr=1e-3, weight_decay=0.0), torch.device("cpu"))
    LRSchedule(1e-3, ScheduleConfig(warmup_steps=0, decay="constant"), 10).apply(opt, 0)
    assert sorted({g["lr"] for g in opt.param_groups}) == pytest.approx([1e-3, 1e-2])
    before = {id(p): p.detach().clone() for p in params}
    ExitProbeLoss(0.5)(probe, _batch(probe.model.config.vocab_size))[0].backward()
    opt.step()
    # Adam's first step moves every entry with a non-zero gradient by its rate (sign of the gradient)
    lens = probe.exit(1).lens
    assert lens is not None
    block = probe.model.blocks[0].attn.qkv.weight  # type: ignore[union-attr]
    step_lens = (lens.weight - before[id(lens.weight)]).abs().max().item()
    step_block = (block - before[id(block)]).abs().max().item()
    assert step_lens == pytest.approx(1e-2, rel=1e-3) and step_block == pytest.approx(1e-3, rel=1e-3)

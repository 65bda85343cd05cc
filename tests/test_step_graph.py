"""The whole-step CUDA graph's CPU-side parts (`legolm.train.step_graph`, `RunConfig.cuda_graph`): settings refused
with one line before anything is written, the learning rate as a tensor the schedule fills, and which losses may be
captured. The capture itself runs in tests/test_cuda.py (it needs a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from legolm.adapters.skip2lora import Skip2LoRAConfig, Skip2LoRAModel
from legolm.adapters.skip2lora_train import Skip2LoRALoss
from legolm.adapters.skip_cache import SkipCache
from legolm.cli.main import main
from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.model.transformer import TransformerLM
from legolm.train.config import FitConfig, OptimConfig, ScheduleConfig
from legolm.train.fit import NextTokenLoss
from legolm.train.optim import LR_SCALE, LRSchedule, build_optimizer, plain_rates, scale_lr
from legolm.train.step_graph import capturable_, graph_capable, graph_safe


def _cfg(**run: object) -> FitConfig:
    cfg = FitConfig()
    cfg.run.cuda_graph, cfg.run.device = True, "cuda"  # planned, not opened: these checks need no GPU
    for key, value in run.items():
        setattr(cfg.run, key, value)
    return cfg


@pytest.mark.parametrize(("run", "optim", "fragment"), [
    ({"device": "cpu"}, {}, "run.cuda_graph needs a CUDA device, run.device is 'cpu' here"),
    ({"strategy": "ddp"}, {}, "run.cuda_graph runs in one process, not under run.strategy ddp"),
    ({}, {"on_nonfinite": "skip"}, "run.cuda_graph cannot skip a non-finite step"),
    ({"compile": True, "compile_mode": "reduce-overhead"}, {}, "compile_mode reduce-overhead captures its own graphs"),
    ({"cuda_graph_warmup": 0}, {}, "run.cuda_graph_warmup must be >= 1, got 0"),
])
def test_settings_a_whole_step_graph_cannot_run_are_refused(run: dict[str, object], optim: dict[str, object],
                                                           fragment: str) -> None:
    cfg = _cfg(**run)
    for key, value in optim.items():
        setattr(cfg.optim, key, value)
    with pytest.raises(ConfigError, match=r"leave run\.cuda_graph off|must be >= 1") as err:
        cfg.validate()
    assert fragment in str(err.value)
    _cfg().validate()  # the same settings on a CUDA device: fine


def test_the_cli_refuses_a_graph_on_the_cpu_in_one_line_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["pretrain", "--run.cuda-graph", "--run.device", "cpu", "--max-steps", "1", "--run.out-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("legolm: error: run.cuda_graph needs a CUDA device")
    assert not out.exists()


def test_the_schedule_fills_tensor_rates_in_place_with_each_groups_scale() -> None:
    """After `capturable_` each group's rate is one tensor, refilled per step (a graph reads it there)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    scale_lr(model[1].parameters(), 10.0)  # groups of their own
    opt = build_optimizer(model.parameters(), OptimConfig(lr=1.0), torch.device("cpu"))
    schedule = LRSchedule(1.0, ScheduleConfig(warmup_steps=4, decay="constant"), total_steps=10)
    capturable_(opt, torch.device("cpu"))
    rates = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(r, torch.Tensor) for r in rates) and all(g["capturable"] for g in opt.param_groups)
    capturable_(opt, torch.device("cpu", 0))  # idempotent, also for a device named with its index (cuda:0 / cuda)
    assert all(g["lr"] is r for g, r in zip(opt.param_groups, rates, strict=True))
    for step in (0, 2, 7):
        lr = schedule.apply(opt, step)
        assert lr == min(1.0, (step + 1) / 4)
        got = sorted(float(g["lr"]) for g in opt.param_groups)
        assert got == pytest.approx(sorted(lr * g.get(LR_SCALE, 1.0) for g in opt.param_groups))
        assert all(g["lr"] is r for g, r in zip(opt.param_groups, rates, strict=True))
    assert sorted(float(r) for r in rates)[-1] == pytest.approx(10.0)  # the scaled group


def test_which_steps_may_be_captured() -> None:
    """A plain next-token step always (but the torch vocabulary-chunk pass, which syncs); Skip2-LoRA without a
    cache, or once a GPU cache holds every window; a host-memory cache or one still filling, never; a loss without
    ``graph_safe`` never."""
    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long),
             "sample_ids": torch.tensor([0])}
    assert graph_safe(NextTokenLoss(), [batch]) and graph_safe(NextTokenLoss(8, "triton", 16), [batch])
    assert not graph_safe(NextTokenLoss(8, "torch", 16), [batch])
    assert not graph_capable(lambda model, b: None) and not graph_safe(lambda model, b: None, [batch])
    base = TransformerLM(ModelConfig.from_name("tiny-pythia"))
    model = Skip2LoRAModel(base, Skip2LoRAConfig(block_indices=[0], r=2, alpha=4.0))
    assert Skip2LoRALoss(None).graph_safe(batch)
    c = base.config
    cache = SkipCache(1, 2, 4, c.n_embd, torch.float32, "cpu", torch.device("cpu"), "k")
    assert not Skip2LoRALoss(cache).graph_safe(batch)  # filling
    cache.put(torch.tensor([0]), model.features(batch["input_ids"]))
    assert bool(cache.filled.all()) and not Skip2LoRALoss(cache).graph_safe(batch)  # full, but in host memory


def test_lego_and_lct_refuse_a_graph_before_any_phase_runs() -> None:
    """Their losses keep host-side state (hard tokens, exits, the lagged state cache): refused up front, not
    after phase 1 has trained."""
    from legolm.lct.train import LCTConfig
    from legolm.lego.config import LegoConfig

    lego = LegoConfig()
    lego.run.cuda_graph, lego.run.device = True, "cuda"
    with pytest.raises(ConfigError, match=r"LEGO.s phase losses .* leave run\.cuda_graph off"):
        lego.validate()
    lct = LCTConfig()
    lct.run.cuda_graph, lct.run.device = True, "cuda"
    with pytest.raises(ConfigError, match="LCT's steps read and write the lagged state cache"):
        lct.validate()


def test_a_graphed_runs_optimizer_checkpoint_keeps_its_rates_as_numbers() -> None:
    """The rate tensors a graph reads are saved as plain numbers (`Wrapped.optimizer_state` goes through
    `plain_rates`): a resume, graphed or not, starts from numbers as `build_optimizer` makes them."""
    model = torch.nn.Linear(4, 2)
    opt = build_optimizer(model.parameters(), OptimConfig(lr=0.5), torch.device("cpu"))
    capturable_(opt, torch.device("cpu"))
    LRSchedule(0.5, ScheduleConfig(warmup_steps=0, decay="constant"), 4).apply(opt, 0)
    state = plain_rates(opt.state_dict())
    assert [g["lr"] for g in state["param_groups"]] == [0.5, 0.5]
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)  # the live optimizer keeps its tensors
    assert plain_rates(state) == state  # numbers stay numbers

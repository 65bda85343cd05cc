"""Lagged Cache Training: the recurrent model, the per-window state cache, the losses and `legolm lct`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.lct.cache import LaggedStateCache, LCTCacheConfig, cache_bytes, choose_device
from legolm.lct.context_pythia import ContextPythia
from legolm.lct.train import LCTLoss, SequentialLoss
from legolm.train.batches import WindowBatches

ROOT = Path(__file__).resolve().parents[1]

T, C = 12, 64


def _model(seed: int = 0, ctx_std: float = 0.3) -> ContextPythia:
    torch.manual_seed(seed)
    model = ContextPythia(ModelConfig.from_name("tiny-pythia"))
    torch.nn.init.normal_(model.ctx_proj.weight, std=ctx_std)  # a context path that matters
    return model.eval()


def test_untrained_context_path_is_plain_pythia() -> None:
    model = _model(ctx_std=0.0)
    torch.nn.init.zeros_(model.ctx_proj.weight)
    idx = torch.randint(0, 512, (2, T))
    assert torch.allclose(model.forward_sequential(idx).logits, model.lm(idx), atol=1e-5)


def test_parallel_forward_with_exact_states_equals_the_recurrence() -> None:
    model = _model()
    idx = torch.randint(0, 512, (3, T))
    exact = model.forward_sequential(idx)
    par = model(idx, exact.states)
    torch.testing.assert_close(par.logits, exact.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(par.states, exact.states, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(idx, None).logits, exact.logits, atol=1e-3)  # the context really matters


def test_position_t_reads_the_state_of_t_minus_1_only() -> None:
    model = _model()
    idx = torch.randint(0, 512, (1, T))
    prev = torch.randn(1, T, C)
    base = model(idx, prev).logits
    bumped = prev.clone()
    bumped[:, 5] += 1.0  # the state of position 5 feeds position 6 (and through attention, later ones)
    out = model(idx, bumped).logits
    assert torch.equal(out[:, :6], base[:, :6])
    assert not torch.allclose(out[:, 6], base[:, 6])
    bumped_last = prev.clone()
    bumped_last[:, -1] += 1.0  # the last state feeds nobody
    assert torch.equal(model(idx, bumped_last).logits, base)


def test_fixed_point_iteration_reaches_the_exact_states_after_T_passes() -> None:
    model = _model()
    idx = torch.randint(0, 512, (2, T))
    exact = model.forward_sequential(idx).states
    states = None
    for _ in range(T):
        states = model(idx, states).states
    assert states is not None
    torch.testing.assert_close(states, exact, atol=1e-4, rtol=1e-4)


def test_sequential_loss_backpropagates_through_the_chain_lct_does_not() -> None:
    model = _model().train()
    idx = torch.randint(0, 512, (1, T))
    emb = model.lm.wte.weight
    # The last position's loss reaches token 0's embedding through attention in both cases; through
    # the recurrent path only in exact training: compare with a model whose attention is cut.
    seq = model.forward_sequential(idx).logits[0, -1].sum()
    (g_seq,) = torch.autograd.grad(seq, emb)
    cache = model(idx, None).states.detach()
    lct = model(idx, cache).logits[0, -1].sum()
    (g_lct,) = torch.autograd.grad(lct, emb)
    assert not torch.allclose(g_seq, g_lct)
    out = model(idx, cache)
    assert out.states.requires_grad and not cache.requires_grad


def _batches(n_windows: int = 6, window: int = T, batch: int = 2, seed: int = 0) -> WindowBatches:
    ids = np.random.default_rng(seed).integers(0, 512, n_windows * window + 1).astype(np.uint16)
    return WindowBatches(ids, window, batch, shuffle=True, seed=seed)  # a new order every epoch


def test_cache_returns_each_windows_own_states_across_reshuffled_epochs() -> None:
    data = _batches()
    cache = LaggedStateCache(data.n_windows, T, C, torch.float32, torch.device("cpu"))
    for batch in data:  # epoch 0: store a state that names its window
        cache.put(batch["sample_ids"], batch["input_ids"], batch["sample_ids"].float()[:, None, None].expand(-1, T, C))
    data.set_epoch(1)
    orders = []
    for batch in data:
        orders.append(batch["sample_ids"].tolist())
        got = cache.get(batch["sample_ids"], batch["input_ids"], torch.device("cpu"))
        assert torch.equal(got[:, 0, 0], batch["sample_ids"].float())
    data.set_epoch(0)
    assert orders != [b["sample_ids"].tolist() for b in data]  # the order did change


def test_feeding_one_windows_cache_to_another_is_refused() -> None:
    data = _batches()
    cache = LaggedStateCache(data.n_windows, T, C, torch.float32, torch.device("cpu"))
    batch = next(iter(data))
    cache.put(batch["sample_ids"], batch["input_ids"], torch.zeros(2, T, C))
    with pytest.raises(ConfigError, match="does not belong to this window"):
        cache.get(batch["sample_ids"], batch["input_ids"].roll(1, dims=0), torch.device("cpu"))
    with pytest.raises(ConfigError, match="holds 12-token windows"):
        cache.check(batch["sample_ids"], torch.zeros(2, T + 1, dtype=torch.long))
    with pytest.raises(ConfigError, match="outside the LCT cache"):
        cache.check(torch.tensor([0, 99]), batch["input_ids"])


def test_lct_loss_initialises_with_a_no_grad_forward_then_feeds_the_last_visit() -> None:
    model = _model().train()
    data = _batches()
    cache = LaggedStateCache(data.n_windows, T, C, torch.float32, torch.device("cpu"))
    loss_fn = LCTLoss(cache)
    batch = next(iter(data))
    ids, sids = batch["input_ids"], batch["sample_ids"]
    with torch.no_grad():
        init = model(ids).states
        expected = model(ids, init)
    loss, n, _ = loss_fn(model, batch)
    ref = torch.nn.functional.cross_entropy(expected.logits.flatten(0, 1), batch["labels"].flatten())
    torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=1e-5)
    assert n == batch["labels"].numel()
    torch.testing.assert_close(cache.get(sids, ids, torch.device("cpu")), expected.states)  # stored for next visit
    loss.backward()
    assert model.ctx_proj.weight.grad is not None


@pytest.mark.parametrize("passes", [1, T])
def test_refresh_passes_recompute_the_cached_states_with_the_current_weights(passes: int) -> None:
    """From a stale cache, each refresh pass is one parallel forward over the states the last one made; after T
    passes the states are exact, so the training loss is the exact recurrence's."""
    model = _model().train()
    data = _batches()
    batch = next(iter(data))
    ids, sids = batch["input_ids"], batch["sample_ids"]
    stale = torch.randn(ids.shape[0], T, C)
    cache = LaggedStateCache(data.n_windows, T, C, torch.float32, torch.device("cpu"))
    cache.put(sids, ids, stale)
    loss, _, _ = LCTLoss(cache, refresh_passes=passes)(model, batch)
    with torch.no_grad():
        prev = stale
        for _ in range(passes):
            prev = model(ids, prev).states
        want = model(ids, prev).logits
        exact = model.forward_sequential(ids).logits
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(loss.detach(), ce(want.flatten(0, 1), batch["labels"].flatten()), atol=1e-5, rtol=1e-5)
    stale_loss = ce(model(ids, stale).logits.flatten(0, 1), batch["labels"].flatten())
    assert not torch.allclose(loss.detach(), stale_loss.detach())  # the refresh changed what trains
    if passes == T:
        torch.testing.assert_close(loss.detach(), ce(exact.flatten(0, 1), batch["labels"].flatten()),
                                   atol=1e-5, rtol=1e-5)


def test_window_grad_passes_give_the_exact_recurrences_gradients() -> None:
    """With every refresh pass keeping its graph (grad_passes = refresh_passes = T), the lagged step is exact
    backpropagation through time: the same loss and gradients as sequential training, from any stale cache."""
    model = _model().train()
    data = _batches()
    batch = next(iter(data))
    cache = LaggedStateCache(data.n_windows, T, C, torch.float32, torch.device("cpu"))
    cache.put(batch["sample_ids"], batch["input_ids"], torch.randn(batch["input_ids"].shape[0], T, C))
    grads = []
    for loss_fn in (LCTLoss(cache, refresh_passes=T, grad_passes=T), SequentialLoss()):
        model.zero_grad()
        loss, _, _ = loss_fn(model, batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "ctx_proj.weight" in grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()
    LCTLoss(cache, refresh_passes=T, grad_passes=0)(model, batch)[0].backward()  # detached context: another gradient
    assert not torch.allclose(model.ctx_proj.weight.grad, grads[1]["ctx_proj.weight"], atol=1e-5, rtol=1e-4)


def test_sequential_loss_equals_cross_entropy_of_the_recurrence() -> None:
    model = _model()
    batch = next(iter(_batches()))
    loss, _, _ = SequentialLoss()(model, batch)
    logits = model.forward_sequential(batch["input_ids"]).logits
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    torch.testing.assert_close(loss, ref)


def test_cache_storage_follows_the_budget() -> None:
    nbytes = cache_bytes(1000, 128, 512, torch.float32)
    assert nbytes == 1000 * 128 * (512 * 4 + 4)
    gpu = torch.device("cuda")
    assert choose_device(LCTCacheConfig(budget_mb=1e6), nbytes, gpu) == gpu
    assert choose_device(LCTCacheConfig(budget_mb=1.0), nbytes, gpu) == torch.device("cpu")
    with pytest.raises(ConfigError, match="budget_mb"):
        choose_device(LCTCacheConfig(device="cuda", budget_mb=1.0), nbytes, gpu)
    with pytest.raises(ConfigError, match="cpu_budget_mb"):
        choose_device(LCTCacheConfig(budget_mb=1.0, cpu_budget_mb=1.0), nbytes, gpu)


def _cli_args(args: list[str], tmp_path: Path) -> list[str]:
    return ["lct", "--config", "configs/lct-tiny.yaml", "--run.out-dir", str(tmp_path / "run"), "--no-run.progress",
            "--data.max-documents", "12", "--model.n-embd", "32", "--model.n-head", "2", "--window", "32",
            "--batch-size", "4", "--data.tokenizer", "bpe:512", *args]


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "LEGOLM_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "legolm.cli.main", *_cli_args(args, tmp_path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def _cli_in_process(args: list[str], tmp_path: Path, capfd: pytest.CaptureFixture[str],
                    monkeypatch: pytest.MonkeyPatch) -> subprocess.CompletedProcess[str]:
    """`_cli` through `main` in this process (same folder and cache): exit code and what reached the process's
    stdout and stderr (file descriptors). For bad input, without a new interpreter's imports; the command's own
    refusal as a process is `test_cli_refuses_a_cache_over_budget`."""
    from legolm.cli.main import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("LEGOLM_CACHE", str(tmp_path / "cache"))
    capfd.readouterr()
    try:
        code = main(_cli_args(args, tmp_path))
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_cli_compares_lct_and_sequential_on_real_text(tmp_path: Path) -> None:
    suspicious_everywhere = ["--eval.ppl-bands.suspicious-below", "1e9", "--eval.ppl-bands.normal-up-to", "1e9",
                             "--eval.ppl-bands.not-learning-above", "1e9"]  # the sanity check must fire
    proc = _cli(["--epochs", "2", "--max-train-windows", "8", "--lag-windows", "2", "--eval.max-batches", "1",
                 *suspicious_everywhere], tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "lct.json").read_text())
    runs = {r["method"]: r for r in summary["runs"]}
    assert [e["epoch"] for e in runs["lct"]["epochs"]] == [1, 2]
    assert all(np.isfinite(e["lag_abs"]) for e in runs["lct"]["epochs"])
    assert all(np.isfinite(e["val_ppl"]) for r in runs.values() for e in r["epochs"])
    assert set(summary["comparison"]) == {"epoch_speedup", "ppl_ratio"}  # speed is measured, not asserted here
    assert "| lct | 2 |" in proc.stdout and "faster than sequential" in proc.stdout
    assert [c["band"] for c in summary["ppl_check"]] == ["suspicious", "suspicious"]
    for method in ("lct", "sequential"):
        line = f"ppl check: {method} final val (exact) perplexity {runs[method]['final_val_ppl']:,.2f} < 1e+09"
        assert f"{line} -> suspicious: leakage" in proc.stdout
    assert (tmp_path / "run" / "lct" / "metrics.jsonl").is_file()


def test_cli_refuses_a_cache_over_budget(tmp_path: Path) -> None:
    proc = _cli(["--epochs", "1", "--lct.budget-mb", "0.001", "--lct.cpu-budget-mb", "0.001"], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("legolm: error:") and "budget" in lines[0]


@pytest.mark.parametrize(("flags", "key"), [
    (["--lct.refresh-passes", "-1"], "lct.refresh_passes"),
    (["--lct.refresh-passes", "33"], "lct.refresh_passes"),
    (["--lct.refresh-passes", "2", "--lct.grad-passes", "3"], "lct.grad_passes"),
])
def test_cli_refuses_refresh_and_grad_passes_out_of_range(tmp_path: Path, flags: list[str], key: str,
                                                          capfd: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    proc = _cli_in_process(["--epochs", "1", *flags], tmp_path, capfd, monkeypatch)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("legolm: error:") and key in lines[0]
    assert not (tmp_path / "run").exists()

"""Helpers the GPU benchmarks share, checked on CPU (a hang here once cost a GPU run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.common import cycled
from legolm.train.batches import WindowBatches


def test_cycled_goes_through_epochs_instead_of_hanging() -> None:
    ids = np.arange(3 * 2 * 8 + 1, dtype=np.uint16)  # 6 windows of 8: 3 batches of 2 per epoch
    source = WindowBatches(ids, 8, 2, shuffle=True, seed=0)
    out = cycled(source, 7, torch.device("cpu"))
    assert len(out) == 7 and source.epoch == 2
    first_epoch = sorted(int(s) for b in out[:3] for s in b["sample_ids"])
    assert first_epoch == list(range(6))  # every window once per epoch
    assert not all(torch.equal(a["sample_ids"], b["sample_ids"]) for a, b in zip(out[:3], out[3:6], strict=True))


def test_serve_benchmark_runs_end_to_end_on_the_cpu() -> None:
    """`python -m benchmarks.serve --smoke`: both servers start, stream to 1 and 2 clients, and the table prints
    (the GPU run cannot be checked here; this catches a benchmark that hangs or crashes)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve", "--smoke"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| tiny-gpt2")]
    assert len(rows) == 4 and {"legolm serve", "hf generate server"} <= {r.split("|")[2].strip() for r in rows}


def test_early_exit_benchmark_overrides_nest_dotted_keys_with_yaml_values() -> None:
    from benchmarks.early_exit import overrides

    assert overrides(["lego.phase2_easy_weight=0.5", "lego.split_candidates=[3, 6]", "window=64", "run.device=cpu"]) \
        == {"lego": {"phase2_easy_weight": 0.5, "split_candidates": [3, 6]}, "window": 64, "run": {"device": "cpu"}}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        overrides(["lego.phase2_easy_weight"])


def _search_grid(tmp_path: Path, runs: list[dict[str, object]]) -> dict[str, object]:
    return {"base": "configs/skip2lora-vs-lora-smollm2.yaml", "common": {"epochs": 3},
            "corpora": {"a": {"data": {"max_documents": 2}}, "b": {"data": {"max_documents": 3}, "eval": {"every": 7}}},
            "runs": runs}


def test_skip2lora_search_builds_each_runs_config_from_base_common_corpus_and_run(tmp_path: Path) -> None:
    from benchmarks.skip2lora_search import planned, run_config
    from legolm.errors import ConfigError

    grid = _search_grid(tmp_path, [{"name": "l", "method": "lora", "set": {"optim": {"lr": 5e-4}}},
                                   {"name": "s", "method": "skip2lora", "corpora": ["b"],
                                    "set": {"skip2lora": {"r": 4}}}])
    plan = planned(grid, None)
    assert [(c, r["name"]) for c, r in plan] == [("a", "l"), ("b", "l"), ("b", "s")]
    assert [(c, r["name"]) for c, r in planned(grid, ["a"])] == [("a", "l")]
    cfg = run_config(grid, "b", plan[2][1], tmp_path)
    got = (cfg.method, cfg.skip2lora.r, cfg.epochs, cfg.data.max_documents, cfg.eval.every)
    assert got == ("skip2lora", 4, 3, 3, 7)
    assert cfg.skip2lora.block_indices == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29]  # from the base file
    assert cfg.optim.lr == 2e-3 and cfg.run.out_dir == str(tmp_path / "b" / "s") and cfg.run.overwrite
    lora = run_config(grid, "a", plan[0][1], tmp_path)
    assert (lora.method, lora.optim.lr, lora.eval.every) == ("lora", 5e-4, 9)
    with pytest.raises(ConfigError):  # a misspelt key fails before any run starts
        run_config(grid, "a", {"name": "x", "method": "lora", "set": {"optim": {"learning_rate": 1}}}, tmp_path)


def test_skip2lora_search_reports_the_gap_to_the_best_lora_run(tmp_path: Path) -> None:
    import json

    from benchmarks.skip2lora_search import report, result_row, run_config

    grid = _search_grid(tmp_path, [])
    rows = []
    for name, method, after, seconds in (("l1", "lora", 40.0, [10.0, 8.0, 6.0]), ("l2", "lora", 50.0, [9.0, 9.0]),
                                         ("s", "skip2lora", 44.0, [5.0, 1.0, 2.0])):
        run = {"name": name, "method": method}
        cfg = run_config(grid, "a", run, tmp_path)
        Path(cfg.run.out_dir).mkdir(parents=True)
        summary = {"method": method, "fit": {"trainable_params": 100}, "before": {"ppl": 60.0},
                   "after": {"ppl": after},
                   "epochs": [{"train_seconds": s, "val_ppl": 70.0 - i if i < 2 else 90.0}
                              for i, s in enumerate(seconds)]}
        (Path(cfg.run.out_dir) / "summary.json").write_text(json.dumps(summary))
        rows.append(result_row("a", run, cfg))
    assert rows[0]["later s"] == 7.0 and rows[2]["later s"] == 1.5 and rows[0]["best epoch"] == 2
    table = report(rows)
    assert [r["run"] for r in rows] == ["l1", "l2", "s"]
    assert rows[2]["vs best lora"] == pytest.approx(0.1) and rows[1]["vs best lora"] == pytest.approx(0.25)
    assert table.index("| l1") < table.index("| s ") < table.index("| l2")  # sorted by held-out ppl


def test_lct_epochs_reads_joined_logs_and_a_cut_runs_val_metrics(tmp_path: Path) -> None:
    """`benchmarks.lct_epochs` takes each run's per-epoch table under its ``tail`` header, and a cut run's val lines."""
    from benchmarks.lct_epochs import parse_log, parse_metrics

    log = tmp_path / "joined.log"
    log.write_text("==> a.log <==\n| method | epoch | train s | val ppl (exact) | lag mean abs | lag relative |\n"
                   "|---|---:|---:|---:|---:|---:|\n| lct | 1 | 8.2 | 335.71 | 0.3 | 109.90% |\n"
                   "| lct | 2 | 5.9 | 249.12 | 0.1 | 57.93% |\n\n==> runs/b.log <==\n"
                   "| sequential | 1 | 62.1 | 768.49 |  |  |\n| lct  | 4.34      | 1.12           | 359.74 |\n")
    assert parse_log(log) == {"a": [{"epoch": 1, "train_s": 8.2, "val_ppl": 335.71},
                                    {"epoch": 2, "train_s": 5.9, "val_ppl": 249.12}],
                              "b": [{"epoch": 1, "train_s": 62.1, "val_ppl": 768.49}]}
    metrics = tmp_path / "val.jsonl"
    metrics.write_text('runs/x/sequential/metrics.jsonl:{"step": 128, "split": "val", "val_ppl": 303.2}\n'
                       'runs/y/lct/metrics.jsonl:{"step": 128, "split": "val", "val_ppl": 999.0}\n'
                       'runs/x/sequential/metrics.jsonl:{"step": 256, "split": "val", "val_ppl": 240.0}\n')
    assert parse_metrics(f"x={metrics}:128") == ("x", [{"epoch": 1, "val_ppl": 303.2}, {"epoch": 2, "val_ppl": 240.0}])


@pytest.mark.parametrize(("name", "kind"), [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel",
     "matmul"),
    ("nvjet_tst_192x192_64x3_2x1_v_bz_coopA_TNT", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>(Flash_fwd_params)", "attention"),
    ("triton_per_fused__log_softmax_backward_data_nll_loss_backward_4", "loss"),
    ("triton_red_fused_native_layer_norm_backward_3", "norm"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<4>, FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "copy / cast"),
    ("triton_poi_fused__to_copy_2", "copy / cast"),
    ("triton_poi_fused_add_gelu_7", "other elementwise"),
    ("aten::addmm", "matmul"),
])
def test_kernels_are_sorted_into_the_kinds_a_step_profile_reports(name: str, kind: str) -> None:
    from benchmarks.common import kernel_kind

    assert kernel_kind(name) == kind


def test_a_step_profile_adds_up_its_kinds_and_compares_them_with_the_wall_time() -> None:
    from benchmarks.common import profile_line, profile_steps

    a = torch.randn(256, 256)
    p = profile_steps(lambda i: torch.softmax(a @ a, -1), [0, 1, 2], torch.device("cpu"), wall_ms=1e3, rows=3)
    kinds = p["ms_per_step"]
    assert kinds["matmul"] > 0 and abs(sum(kinds.values()) - p["kernels_ms"]) < 1e-2
    assert p["idle_ms"] == pytest.approx(1e3 - p["kernels_ms"], abs=1e-2) and len(p["top"]) == 3
    assert "matmul" in profile_line(p) and "of 1000.00 ms a step" in profile_line(p)


def test_cost_split_is_the_slope_and_intercept_of_whole_call_times() -> None:
    """3 calls of 10 tokens in 0.36 s and of 20 in 0.66 s: 0.01 s a token (0.3 s more for 30 more tokens)
    and 0.02 s a call (0.12 s a call of 10 tokens, 0.1 s of it tokens)."""
    from benchmarks.early_exit import split_costs

    per_token, per_call = split_costs(0.36, 0.66, 3, 10, 20)
    assert per_token == pytest.approx(0.01) and per_call == pytest.approx(0.02)

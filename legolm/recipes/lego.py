"""The ``legolm lego`` job: train a LEGO model on real text, evaluate its exits, time its decoders, report.

::

    prepare corpus ─ train_lego (phase 1 ─ calibrate τ ─ extend | split ─ hard examples ─ phase 2
                                 [─ phase 3: distillation into a draft exit | into the shallow exit ─ re-calibrate τ])
                   ─ save model/ (loads with load_pretrained as a LegoLM, τ included)
                   ─ quality table (shallow / deep / routed, all and hard tokens)
                   ─ decode table (full depth, threshold sweep, kv modes, speculative) ─ curve.png / curve.csv

The run directory gets ``phase1/``, ``phase2/`` and ``phase3/`` (the runs of `fit`; phase 3 when on),
``model/``, ``curve.png``, ``curve.csv``, ``split_curve.{png,csv}`` (pretrained route with candidates) and
``summary.json`` (with a ``phase3`` block: which exit trained, the drafter's agreement with the deep exit and
perplexity, the shallow perplexity and τ before and after distillation).
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path
from typing import Any

from legolm.checkpoints.native import save_checkpoint, save_lego_meta
from legolm.config import dump_yaml
from legolm.data.tokenized import TokenizedCorpus, prepare_corpus
from legolm.lego.config import STORE_DTYPES, LegoConfig
from legolm.lego.evaluate import TokenScores, score_tokens
from legolm.lego.report import (
    Setting,
    choose_kv_mode,
    curve_row,
    decode_path_ppl,
    format_table,
    measure_decode,
    plot_curve,
    quality_table,
    val_windows,
)
from legolm.lego.split import plot_splits
from legolm.lego.train import LegoTraining, train_lego
from legolm.model.lego import LegoLM, quantile_threshold
from legolm.train.distributed import init_distributed
from legolm.train.fit import FitResult
from legolm.train.run_dir import check_run_dir, hold_run_dir
from legolm.utils.io import atomic_write_text, finite_json


def run(cfg: LegoConfig, corpus: TokenizedCorpus | None = None) -> dict[str, Any]:
    """Check, prepare the data (unless ``corpus`` is given), train both phases, evaluate, decode, report."""
    cfg.validate()
    inputs = [cfg.model.init, cfg.data.source, cfg.data.tokenizer, cfg.data.cache_dir]
    check_run_dir(cfg.run.out_dir, cfg.run.overwrite, cfg.run.resume, inputs)
    dist = init_distributed(cfg.run)  # under torchrun: both phases train on every rank, rank 0 reports
    with dist.main_first():
        corpus = corpus if corpus is not None else prepare_corpus(cfg.data, progress=cfg.run.progress)
    dist.barrier()  # every rank has checked the run directory before rank 0 creates it
    if not dist.is_main:  # rank 0 holds the run directory, evaluates, times and reports
        train_lego(cfg, corpus)
        return {}
    with hold_run_dir(cfg.run.out_dir, cfg.run.overwrite, cfg.run.resume, inputs) as out:
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
        trained = train_lego(cfg, corpus)
        summary = evaluate_and_report(cfg, corpus, trained, out)
        atomic_write_text(out / "summary.json", finite_json(summary, str(out / "summary.json"), indent=2))
    return summary


def decode_settings(cfg: LegoConfig, tau: float, scores: TokenScores) -> list[Setting]:
    """Full depth first, then the threshold sweep (never ... always exit), the other kv modes at τ, IF graph
    nodes at τ, speculative."""
    d = cfg.decode
    lg = cfg.lego
    calibrated = "given" if lg.threshold is not None else f"calibrated r={lg.target_ratio:g}" \
        if lg.calibrate == "ratio" else f"calibrated +{100 * lg.split_tolerance:g}%"
    sweep = [("never exit", 1.0), (calibrated, tau),
             *[(f"r={r:g}", quantile_threshold(scores.conf, r)) for r in cfg.lego.curve_ratios], ("always exit", 0.0)]
    sweep.sort(key=lambda item: -item[1])
    return [Setting("full depth", "full"),
            *[Setting(label, "threshold", t, d.kv_mode) for label, t in sweep],
            *[Setting(calibrated, "threshold", tau, mode) for mode in d.compare_kv_modes if mode != d.kv_mode],
            *[Setting(f"{calibrated}, IF nodes", "threshold", tau, mode, if_nodes=True) for mode in d.if_node_kv_modes],
            *[Setting(f"speculative d={k}", "speculative", draft_tokens=k) for k in d.draft_tokens]]


def evaluate_and_report(cfg: LegoConfig, corpus: TokenizedCorpus, trained: LegoTraining, out: Path) -> dict[str, Any]:
    """Save the model, score the validation windows, time the decoders, print and write the tables."""
    model, tau, d = trained.model, trained.threshold, cfg.decode
    save_checkpoint(model, out / "model", corpus.tokenizer, overwrite=True)
    split_note = None
    if trained.splits:
        write_csv(out / "split_curve.csv", [asdict(p) for p in trained.splits])
        split_note = plot_splits(trained.splits, out / "split_curve.png", cfg.lego.split_tolerance)
    scores = score_tokens(model, trained.val_batches, cfg.lego.calib_batches, progress=cfg.run.progress)
    temperature = model.meta.routing_temperature
    quality, quality_values = quality_table(scores, tau, temperature)
    settings = decode_settings(cfg, tau, scores)
    model.to(STORE_DTYPES[d.dtype])  # decoding only from here on (saved and scored in fp32 above)
    prompts = val_windows(corpus.val, d.prompts, d.prompt_len)
    measured = measure_decode(model, prompts, settings, d.max_new_tokens, d.fused, d.fused_kernel, d.repeats, d.warmup,
                              progress=cfg.run.progress)
    scored = val_windows(corpus.val, d.score_windows, d.prompt_len + d.score_len, offset=d.prompt_len)
    paths = {}
    rows = []
    for s, m in zip(settings, measured, strict=True):
        key = (s.mode == "threshold", s.threshold if s.mode == "threshold" else 1.0, s.kv_mode)
        if key not in paths:  # full depth and speculative share the deep model's path
            paths[key] = decode_path_ppl(model, scored, d.prompt_len, s, progress=cfg.run.progress)
        rows.append(curve_row(scores, temperature, s, m, measured[0], paths[key]))
    kv = choose_kv_mode(rows, tau, d.kv_tolerance)
    if kv is not None:  # generation's default for this model (`GenerationConfig.kv_mode`)
        model.meta.kv_mode = kv.kv_mode
        save_lego_meta(model, out / "model")
    phase1_ppl, deep_ppl = scores.shallow_ppl(), scores.deep_ppl()
    table = format_table(rows)
    note = plot_curve(rows, out / "curve.png", phase1_ppl, deep_ppl)
    write_csv(out / "curve.csv", [asdict(r) for r in rows])
    device = next(model.parameters()).device
    base = rows[0]
    print(f"\nLEGO {model.split} -> {model.n_layer} layers, threshold {tau:.4f}; quality over {len(scores):,} "
          f"validation tokens (fp32):\n\n{quality}\n")
    print(f"decoding: batch 1, {d.prompts} prompts x {d.max_new_tokens} new tokens (greedy, {d.dtype}) on {device}, "
          f"whole calls, median of {d.repeats} rounds; full depth ({'fused' if base.fused else 'static cache'}) "
          f"{base.tok_per_s:,.0f} tok/s; decode-path PPL over {scored.shape[0]} x {d.score_len} tokens"
          f"{'; fused threshold rows not marked IF nodes read each decision on the host' if base.fused else ''}\n")
    print(table)
    vocab = model.config.vocab_size
    print(cfg.phase1.eval.ppl_bands.lines({"phase-1 (shallow)": phase1_ppl}, vocab))  # sanity
    print(cfg.phase2.eval.ppl_bands.lines({"deep": deep_ppl, "routed (calibrated)": scores.routed_ppl(
        tau, temperature)}, vocab))
    print(note or f"quality/speed curve: {out / 'curve.png'}")
    if trained.splits:
        print(split_note or f"split curve: {out / 'split_curve.png'} (chosen k={model.split})")
    reference = vs_unmodified(scores, tau, temperature, trained.reference_ppl, cfg.lego.split_tolerance, deep_ppl)
    if trained.distill is not None:
        print(trained.distill.line())
    if kv is not None:
        print(kv.line())
    print(f"model saved to {out / 'model'}")
    fit_results: dict[str, Any] = {name: fit_summary(r) for name, r in (("phase1", trained.phase1),
                                                                         ("phase2", trained.phase2))}
    fit_results["phase3"] = phase3_block(trained)
    return {"threshold": tau, "split": model.split, "num_layers": model.n_layer, "phase1_ppl": phase1_ppl,
            "deep_ppl": deep_ppl, "routed_ppl": scores.routed_ppl(tau, temperature), "quality": quality_values,
            "quality_table": quality, "hard_examples": {"train": trained.hard_train.summary(),
                                                        "val": trained.hard_val.summary()},
            "rows": [asdict(r) for r in rows], "device": str(device),
            "split_curve": [asdict(p) for p in trained.splits], "vs_unmodified": reference, **fit_results,
            "table": table, "model": str(out / "model"), "kv_choice": None if kv is None else asdict(kv)}


def fit_summary(result: FitResult | None) -> dict[str, Any] | None:
    """A phase's `FitResult` for the summary (its run directory left out), None when the phase did not run."""
    return None if result is None else {k: v for k, v in asdict(result).items() if k != "run_dir"}


def phase3_block(trained: LegoTraining) -> dict[str, Any] | None:
    """The summary's ``phase3`` block: what exit distillation changed, and its `fit` run (None when it was off)."""
    if trained.distill is None or trained.phase3 is None:
        return None
    return {**asdict(trained.distill), "fit": fit_summary(trained.phase3)}


def vs_unmodified(scores: TokenScores, tau: float, temperature: float, reference_ppl: float | None,
                  tolerance: float, deep_ppl: float) -> dict[str, Any] | None:
    """Pretrained route: routed perplexity at τ against the unmodified model's, and against the trained deep model's
    (the tolerance is the unmodified model's; where training improved the deep model, the gap between the two is
    quality the exits spend: printed; None on the grown route)."""
    if reference_ppl is None:
        return None
    routed = scores.routed_ppl(tau, temperature)
    row = {"unmodified_ppl": reference_ppl, "routed_ppl": routed, "routed_over_unmodified": routed / reference_ppl,
           "deep_ppl": deep_ppl, "routed_over_deep": routed / deep_ppl,
           "shallow_ratio": scores.shallow_ratio(tau), "within_tolerance": routed <= (1 + tolerance) * reference_ppl}
    print(f"routed perplexity {routed:.4g} vs the unmodified model's {reference_ppl:.4g} "
          f"({100 * (routed / reference_ppl - 1):+.2f}%, tolerance {100 * tolerance:g}%) at shallow ratio "
          f"{row['shallow_ratio']:.3f}; vs the trained deep model's {deep_ppl:.4g}: "
          f"{100 * (routed / deep_ppl - 1):+.2f}%")
    return row


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows of equal keys as a CSV file, written atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


__all__ = ["LegoLM", "decode_settings", "evaluate_and_report", "run", "write_csv"]

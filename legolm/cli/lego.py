"""``legolm lego``: LEGO end to end on real text: phase 1, calibration, extension, phase 2, early-exit decoding.

    legolm lego --config configs/lego-tinystories.yaml [--lego.target-ratio 0.4 ...] [--overwrite]

Every setting is a `LegoConfig` key (``--print-config`` shows them all). Prints one table:
phase-1, deep and routed perplexity, shallow ratio, compute cost and the measured decode speedup
against full depth, for the calibrated threshold and the others of the curve. The run directory
gets ``phase1/`` and ``phase2/`` (the runs of `fit`: metrics, loss.png, checkpoints), ``model/``
(the LEGO checkpoint; ``legolm generate --model run/model`` runs its deep model), ``curve.png``,
``curve.csv`` and ``summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from legolm.cli.args import add_config_args, dump_yaml, resolve_run_config
from legolm.lego.config import LegoConfig

ALIASES = {"--overwrite": "run.overwrite", "--resume": "run.resume"}


def run(ns: argparse.Namespace) -> None:
    cfg = resolve_run_config(LegoConfig, ns)
    if ns.print_config:
        print(dump_yaml(cfg), end="")
        return
    lego(cfg)


def lego(cfg: LegoConfig, corpus: Any = None) -> dict[str, Any]:
    """Check, prepare the data (unless ``corpus`` is given), train both phases, evaluate, decode, report."""
    from legolm.data.tokenized import prepare_corpus
    from legolm.train.checkpoint import check_run_dir, open_run_dir
    from legolm.train.distributed import init_distributed
    from legolm.utils.io import atomic_write_text

    cfg.validate()
    check_run_dir(cfg.run.out_dir, cfg.run.overwrite, cfg.run.resume)
    dist = init_distributed(cfg.run)  # under torchrun: both phases train on every rank, rank 0 reports
    with dist.main_first():
        corpus = corpus if corpus is not None else prepare_corpus(cfg.data, progress=cfg.run.progress)
    dist.barrier()  # every rank has checked the run directory before rank 0 creates it
    out = dist.on_main(lambda: open_run_dir(cfg.run.out_dir, cfg.run.overwrite, cfg.run.resume))
    if dist.is_main:
        atomic_write_text(out / "config.yaml", dump_yaml(cfg))
    summary = evaluate_and_report(cfg, corpus, out)
    if dist.is_main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def evaluate_and_report(cfg: LegoConfig, corpus: Any, out: Path) -> dict[str, Any]:
    """Train (`train_lego`), save, score the validation windows, time the decode settings, print the table."""
    from legolm.lego.config import STORE_DTYPES
    from legolm.lego.evaluate import score_tokens
    from legolm.lego.hard_examples import evaluate_on_hard_examples
    from legolm.lego.model import save_lego
    from legolm.lego.report import (
        Setting,
        curve_row,
        decode_path_ppl,
        format_table,
        measure_decode,
        plot_curve,
        val_windows,
    )
    from legolm.lego.threshold import quantile_threshold
    from legolm.lego.train import train_lego
    from legolm.train.distributed import current
    from legolm.utils.io import atomic_write_text

    trained = train_lego(cfg, corpus)
    if not current().is_main:  # rank 0 evaluates, times and reports
        return {}
    model, tau, d = trained.model, trained.threshold, cfg.decode
    save_lego(model, out / "model", corpus.tokenizer, overwrite=True)
    scores = score_tokens(model, trained.val_batches, cfg.lego.calib_batches, progress=cfg.run.progress)
    hard = evaluate_on_hard_examples(model, trained.hard_val, cfg.phase2.eval.batch_size or cfg.phase2.batch_size)
    calibrated = f"calibrated r={cfg.lego.target_ratio:g}" if cfg.lego.threshold is None else "given"
    sweep = [("never exit", 1.0), (calibrated, tau),
             *[(f"r={r:g}", quantile_threshold(scores.conf, r)) for r in cfg.lego.curve_ratios], ("always exit", 0.0)]
    sweep.sort(key=lambda item: -item[1])
    settings = [Setting(label, t, d.kv_mode) for label, t in sweep]
    settings += [Setting(calibrated, tau, mode) for mode in d.compare_kv_modes if mode != d.kv_mode]
    model.to(STORE_DTYPES[d.dtype])  # decoding only from here on (saved and scored in fp32 above)
    prompts = val_windows(corpus.val, d.prompts, d.prompt_len)
    measured = measure_decode(model, prompts, [Setting("full depth", None, "fill"), *settings], d.max_new_tokens,
                              d.repeats, d.warmup, progress=cfg.run.progress)
    scored = val_windows(corpus.val, d.score_windows, d.prompt_len + d.score_len, offset=d.prompt_len)
    rows = [curve_row(scores, model.meta.routing_temperature, s, m, measured[0],
                      decode_path_ppl(model, scored, d.prompt_len, s, progress=cfg.run.progress))
            for s, m in zip(settings, measured[1:], strict=True)]
    phase1_ppl, deep_ppl = scores.shallow_ppl(), scores.deep_ppl()
    table = format_table(rows, phase1_ppl, deep_ppl)
    note = plot_curve(rows, out / "curve.png", phase1_ppl, deep_ppl)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(asdict(rows[0])))
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    atomic_write_text(out / "curve.csv", buf.getvalue())
    device = next(model.parameters()).device
    print(f"\nLEGO {model.split} -> {model.n_layer} layers, threshold {tau:.4f}; full-forward PPLs over "
          f"{len(scores):,} validation tokens, decode-path PPL over {scored.shape[0]} x {d.score_len}; decode: "
          f"batch 1, {d.prompts} prompts x {d.max_new_tokens} new tokens (greedy, {d.dtype}) on {device}, median of "
          f"{d.repeats} rounds; full depth {measured[0].tokens / measured[0].decode_s:,.0f} tok/s\n")
    print(table)
    print(f"\nhard validation tokens ({int(hard['hard_tokens']):,}): shallow PPL {hard['shallow_ppl']:.2f}, "
          f"deep PPL {hard['deep_ppl']:.2f}, routed PPL {hard['routed_ppl']:.2f}")
    print(cfg.phase1.eval.ppl_bands.lines({"phase-1 (shallow)": phase1_ppl}, model.config.vocab_size))  # sanity
    print(cfg.phase2.eval.ppl_bands.lines({"deep": deep_ppl, "routed (calibrated)": scores.routed_ppl(
        tau, model.meta.routing_temperature)}, model.config.vocab_size))
    print(note or f"quality/speed curve: {out / 'curve.png'}")
    print(f"model saved to {out / 'model'}")
    fit_results = {name: None if r is None else {k: v for k, v in asdict(r).items() if k != "run_dir"}
                   for name, r in (("phase1", trained.phase1), ("phase2", trained.phase2))}
    return {"threshold": tau, "split": model.split, "num_layers": model.n_layer, "phase1_ppl": phase1_ppl,
            "deep_ppl": deep_ppl, "routed_ppl": scores.routed_ppl(tau, model.meta.routing_temperature),
            "hard_val": hard, "hard_examples": {"train": trained.hard_train.summary(),
                                                "val": trained.hard_val.summary()},
            "rows": [asdict(r) for r in rows], "baseline": asdict(measured[0]), "device": str(device),
            **fit_results, "table": table, "model": str(out / "model")}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lego", help="LEGO: shallow model, hard-token deepening, true early-exit decoding",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    add_config_args(p, LegoConfig, ALIASES)
    p.set_defaults(func=run)

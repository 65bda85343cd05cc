"""The ``legolm lct`` job: LCT and exact sequential training of the same `ContextPythia` on the same data.

Each method starts from the same seed and weights, sees the same windows in the same order, is
evaluated by the exact recurrence after every epoch, and gets its own run directory
(``<out_dir>/<method>``). The comparison is one table, ``lct.json`` and ``lct.png``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from legolm.errors import ConfigError
from legolm.lct.cache import LaggedStateCache, cache_bytes, choose_device
from legolm.lct.context_pythia import ContextPythia
from legolm.lct.train import LagMonitor, LCTConfig, LCTLoss, SequentialLoss, exact_eval
from legolm.train.batches import WindowBatches
from legolm.utils.io import atomic_savefig, atomic_write_text, finite_json, pyplot


def method_config(cfg: LCTConfig, method: str, steps_per_epoch: int) -> LCTConfig:
    """The run config of one method: its own run directory, evaluation at every epoch end."""
    run = dataclasses.replace(cfg.run, out_dir=str(Path(cfg.run.out_dir) / method))
    return dataclasses.replace(cfg, run=run, eval=dataclasses.replace(cfg.eval, every=steps_per_epoch))


def train_method(cfg: LCTConfig, method: str, train_ids: Any, val_ids: Any, vocab: int, eos: int) -> dict[str, Any]:
    """Train one method through `fit`; return its per-epoch records and totals."""
    from legolm.train.distributed import init_distributed
    from legolm.train.fit import fit

    torch.manual_seed(cfg.run.seed)
    model = ContextPythia(cfg.model.model_config(vocab, eos))
    dist = init_distributed(cfg.run)
    device = dist.run_device(cfg.run.device)
    train = WindowBatches(train_ids, cfg.window, cfg.batch_size, shuffle=True, seed=cfg.run.seed, **dist.shard())
    val = WindowBatches(val_ids, cfg.window, cfg.eval_batch_size, shuffle=False, drop_last=False)

    def eval_fn(m: object) -> dict[str, float]:
        return exact_eval(model, val, cfg.eval.max_batches, device, cfg.run.precision)

    probe_ids = torch.arange(min(cfg.lag_windows, train.n_windows))
    probe = (probe_ids, torch.stack([torch.from_numpy(train.ids[i * cfg.window: (i + 1) * cfg.window]
                                                      .astype("int64")) for i in probe_ids.tolist()]))
    cache = None
    if method == "lct":
        dtype = getattr(torch, cfg.lct.dtype)
        nbytes = cache_bytes(train.n_windows, cfg.window, model.config.n_embd, dtype)
        where = choose_device(cfg.lct, nbytes, device)
        print(f"LCT cache: {train.n_windows:,} windows x {cfg.window} x {model.config.n_embd} {cfg.lct.dtype} "
              f"= {nbytes / 2**20:,.1f} MiB on {where}")
        cache = LaggedStateCache(train.n_windows, cfg.window, model.config.n_embd, dtype, where)
    monitor = LagMonitor(probe, cache, device)
    loss_fn = LCTLoss(cache, cfg.lct.refresh_passes, cfg.lct.grad_passes) if cache is not None else SequentialLoss()
    result = fit(model, train, method_config(cfg, method, len(train) // cfg.grad_accum), loss_fn=loss_fn,
                 eval_fn=eval_fn, callbacks=[monitor])
    epochs = [{**{k: v for k, v in dataclasses.asdict(r).items() if k != "extra"}, **r.extra} for r in monitor.records]
    return {"method": method, "epochs": epochs,
            "final_val_ppl": result.final_val_ppl, "peak_memory_mb": result.peak_memory_mb,
            "params": result.total_params, "cache_mb": cache.nbytes / 2**20 if cache is not None else 0.0}


def run(cfg: LCTConfig) -> dict[str, Any]:
    """Prepare the data once, train every method, write and print the comparison."""
    from legolm.data.tokenized import check_fits, prepare_corpus
    from legolm.train.distributed import init_distributed
    from legolm.train.run_dir import check_run_dir

    cfg.validate()
    cfg.data.validate()
    if cfg.run.resume:
        raise ConfigError("legolm lct compares whole runs; --resume is not supported, rerun with --overwrite")
    inputs = [cfg.data.source, cfg.data.tokenizer, cfg.data.cache_dir]
    for method in cfg.methods:
        check_run_dir(Path(cfg.run.out_dir) / method, cfg.run.overwrite, cfg.run.resume, inputs)
    dist = init_distributed(cfg.run)  # under torchrun: join the job (DDP; the LCT cache is shared by all ranks)
    with dist.main_first():
        corpus = prepare_corpus(cfg.data, progress=cfg.run.progress)
    model_config = cfg.model.model_config(corpus.vocab_size, corpus.eos_id)
    check_fits(corpus, model_config, cfg.window)
    train_ids = corpus.train
    if cfg.max_train_windows is not None:
        train_ids = train_ids[: cfg.max_train_windows * cfg.window + 1]
    runs = [train_method(cfg, m, train_ids, corpus.val, corpus.vocab_size, corpus.eos_id) for m in cfg.methods]
    if not dist.is_main:  # rank 0 writes the comparison
        return {}
    comparison = compare(runs)
    checks = [cfg.eval.ppl_bands.check(f"{r['method']} final val (exact)", r["final_val_ppl"], model_config.vocab_size)
              for r in runs]
    summary = {"config": dataclasses.asdict(cfg), "runs": runs, "comparison": comparison,
               "ppl_check": [c.to_dict() for c in checks]}
    out = Path(cfg.run.out_dir)
    atomic_write_text(out / "lct.json", finite_json(summary, f"{out / 'lct.json'}", indent=2))
    if cfg.run.plot:
        plot(runs, out / "lct.png")
    print(report(runs, comparison))
    print("\n".join(c.message for c in checks))
    return summary


def compare(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Speedup of LCT's epochs over sequential ones and the final perplexity ratio (when both ran)."""
    by = {r["method"]: r for r in runs}
    if not {"lct", "sequential"} <= set(by):
        return {}

    def mean_epoch(r: dict[str, Any]) -> float:
        return sum(e["train_seconds"] for e in r["epochs"]) / max(len(r["epochs"]), 1)

    return {"epoch_speedup": mean_epoch(by["sequential"]) / max(mean_epoch(by["lct"]), 1e-9),
            "ppl_ratio": by["lct"]["final_val_ppl"] / by["sequential"]["final_val_ppl"]}


def report(runs: list[dict[str, Any]], comparison: dict[str, float]) -> str:
    lines = ["", "| method | epoch | train s | val ppl (exact) | lag mean abs | lag relative |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        for e in r["epochs"]:
            lag = f"{e['lag_abs']:.4f}" if "lag_abs" in e else ""
            rel = f"{e['lag_rel']:.2%}" if "lag_rel" in e else ""
            lines.append(f"| {r['method']} | {e['epoch']} | {e['train_seconds']:.1f} | {e['val_ppl']:.2f} | "
                         f"{lag} | {rel} |")
    if comparison:
        lines += ["", f"LCT epochs are {comparison['epoch_speedup']:.1f}x faster than sequential; final val ppl "
                  f"LCT / sequential = {comparison['ppl_ratio']:.3f} ({100 * (comparison['ppl_ratio'] - 1):+.1f}%)"]
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Validation perplexity and cache lag per epoch (skipped with a note without matplotlib)."""
    plt = pyplot()
    if plt is None:
        print("note: lct.png skipped (pip install matplotlib)")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in runs:
        epochs = [e["epoch"] for e in r["epochs"]]
        ax1.plot(epochs, [e["val_ppl"] for e in r["epochs"]], marker="o", label=r["method"])
        if r["method"] == "lct":
            ax2.plot(epochs, [e["lag_rel"] for e in r["epochs"]], marker="o", color="C0")
    ax1.set(xlabel="epoch", ylabel="validation perplexity (exact recurrence)", title="quality")
    ax2.set(xlabel="epoch", ylabel="mean |cache - exact| / mean |exact|", title="LCT cache lag")
    ax1.legend()
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)

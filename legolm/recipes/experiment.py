"""The ``legolm experiment`` job, the unified experiment: every model trained by `fit` on the same
text, budget and seed, then scored the same way.

::

    corpus (samples docs) ─ prepare_corpus ─┬─ train ─┐
    reversal train sentences ─ tokens ──────┼─────────┴─ WindowBatches(seed) ─▶ fit ─▶ model
                                            └─ val ─────▶ sliding-window PPL ◀────────┤
    reversal test prompts ─────────────────────────────▶ forward / backward PPL, exact match ◀┘

Each model trains in its own spawned process, so its peak memory (CUDA: peak allocated; CPU:
peak resident set of that process) is its own, and every model starts from the same seeded
state. Under ``torchrun`` (``--run.strategy ddp|fsdp2``) each rank trains the models one after the
other in its own process (a rank joins its process group once), so a CPU peak is the running one.
Results land in ``<out_dir>/<model>/result.json``; the parent collects them into the
table (``results.md``, ``results.csv``, ``results.jsonl``) and ``results.png``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from legolm.errors import LegolmError
from legolm.experiment.config import ExperimentConfig
from legolm.experiment.report import ModelResult, write_reports
from legolm.utils.io import atomic_write_text, finite_json

RESULT, ERROR = "result.json", "error.txt"


def run(cfg: ExperimentConfig) -> list[ModelResult]:
    """Check the settings and the data, then train and score each model in turn (see the module docstring).

    Raises:
        LegolmError: Bad settings or data (before anything is trained), an existing output directory
            without ``overwrite``, or a model's run failing.
    """
    from legolm.data.tokenized import check_fits, prepare_corpus
    from legolm.model.factory import model_config
    from legolm.train.distributed import init_distributed
    from legolm.train.run_dir import check_run_dir, open_run_dir, release_run_dir

    cfg.validate()
    out = Path(cfg.run.out_dir)
    if out.exists() and not cfg.run.overwrite:
        raise LegolmError(f"output directory {out} already exists; pass --overwrite or choose another --run.out-dir")
    data = cfg.data_config()
    inputs = [data.source, data.tokenizer, data.cache_dir, cfg.reversal.data_dir]
    check_run_dir(out, cfg.run.overwrite, False, inputs)
    dist = init_distributed(cfg.run)  # under torchrun: every model trains on all ranks, in this process
    with dist.main_first():
        corpus = prepare_corpus(cfg.data_config(), progress=cfg.run.progress)  # tokenized once, cached for the runs
    configs = [model_config(kind, **cfg.model.options(kind, corpus.vocab_size, corpus.eos_id, corpus.tokenizer.bos_id))
               for kind in cfg.models]  # every model's options are checked before the first one trains
    for config in configs:
        check_fits(corpus, config, cfg.window)
    _training_stream(cfg, corpus)  # reversal data present and readable
    dist.barrier()
    dist.on_main(lambda: open_run_dir(out, cfg.run.overwrite, False, inputs))  # emptied, marked and locked
    try:
        if dist.distributed:  # a torchrun rank joins its process group once: no process per model
            scored = [train_and_score(kind, cfg, out / kind) for kind in cfg.models]
            results = [r for r in scored if r is not None]
            if not dist.is_main:
                return []
        else:
            results = [_spawn(kind, cfg, out / kind) for kind in cfg.models]
        write_reports(results, cfg, out, configs[0].vocab_size)  # one corpus: one vocabulary for every model
    finally:
        if dist.is_main:
            release_run_dir(out)
    return results


def _spawn(kind: str, cfg: ExperimentConfig, run_dir: Path) -> ModelResult:
    """Train and score one model in a fresh process; its result.json (or error.txt) comes back."""
    proc = mp.get_context("spawn").Process(target=_worker, args=(kind, cfg, str(run_dir)), name=f"experiment-{kind}")
    proc.start()
    try:
        proc.join()
    except KeyboardInterrupt:
        proc.terminate()
        proc.join()
        raise
    if (run_dir / RESULT).is_file():
        return ModelResult(**json.loads((run_dir / RESULT).read_text()))
    reason = (run_dir / ERROR).read_text().strip() if (run_dir / ERROR).is_file() else f"exit code {proc.exitcode}"
    raise LegolmError(f"the {kind} run failed: {reason.splitlines()[-1] if reason else proc.exitcode}")


def _worker(kind: str, cfg: ExperimentConfig, run_dir: str) -> None:
    """Process entry point: `train_and_score`, with any failure written to error.txt."""
    path = Path(run_dir)
    try:
        result = train_and_score(kind, cfg, path)
        assert result is not None  # a plain process is rank 0
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / RESULT, finite_json(asdict(result), f"the {kind} result", indent=2))
    except LegolmError as err:
        path.mkdir(parents=True, exist_ok=True)
        (path / ERROR).write_text(str(err) + "\n")
        raise SystemExit(2) from None
    except BaseException:
        path.mkdir(parents=True, exist_ok=True)
        (path / ERROR).write_text(traceback.format_exc())
        raise


def _training_stream(cfg: ExperimentConfig, corpus: Any) -> Any:
    """Training tokens: the corpus's training documents, then the reversal sentences (if included)."""
    import numpy as np

    from legolm.eval.reversal import training_ids

    if not cfg.include_reversal:
        return np.asarray(corpus.train, dtype=np.int64)
    reversal = training_ids(corpus.tokenizer, cfg.reversal, cfg.run.seed)
    return np.concatenate([np.asarray(corpus.train, dtype=np.int64), reversal])


def train_and_score(kind: str, cfg: ExperimentConfig, run_dir: Path) -> ModelResult | None:
    """Build ``kind`` (seeded), `fit` it, then score it under the training precision (rank 0; others: None)."""
    import torch

    from legolm.checkpoints.native import save_checkpoint
    from legolm.data.tokenized import prepare_corpus
    from legolm.eval.perplexity import sliding_window_ppl
    from legolm.eval.reversal import evaluate_reversal
    from legolm.layers.memory_state import memory_state_nbytes
    from legolm.model.factory import create_model
    from legolm.train.batches import WindowBatches
    from legolm.train.distributed import current
    from legolm.train.fit import autocast_for, fit

    t0 = time.perf_counter()
    corpus = prepare_corpus(cfg.data_config(), progress=False)
    torch.manual_seed(cfg.run.seed)
    model = create_model(kind, **cfg.model.options(kind, corpus.vocab_size, corpus.eos_id, corpus.tokenizer.bos_id))
    shard = current().shard()
    train = WindowBatches(_training_stream(cfg, corpus), cfg.window, cfg.batch_size, shuffle=True, seed=cfg.run.seed,
                          **shard)
    eval_batch = cfg.eval_batch_size
    val = WindowBatches(corpus.val, cfg.window, eval_batch, shuffle=False, drop_last=False, **shard)
    run_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(run_dir), overwrite=True))
    fit_result = fit(model, train, run_cfg, val=val)
    if not current().is_main:  # rank 0 scores and saves
        return None
    model.eval()
    device = next(model.parameters()).device
    stride = cfg.eval.final_stride or max(1, cfg.window // 2)
    with autocast_for(device, cfg.run.precision):
        ppl = sliding_window_ppl(model, corpus.val, cfg.window, stride, eval_batch, device, progress=cfg.run.progress)
        reversal = evaluate_reversal(model, corpus.tokenizer, cfg.reversal)
    save_checkpoint(model, run_dir / "model", corpus.tokenizer, overwrite=True)
    return ModelResult(
        model=kind, params=fit_result.total_params, val_ppl=ppl.ppl, forward_ppl=reversal.forward.ppl,
        backward_ppl=reversal.backward.ppl, gap=reversal.gap, forward_acc=reversal.forward.accuracy,
        backward_acc=reversal.backward.accuracy, tokens_per_s=fit_result.tokens_per_s,
        peak_memory_mb=fit_result.peak_memory_mb, train_s=fit_result.seconds, total_s=time.perf_counter() - t0,
        memory_kb=memory_state_nbytes(model) / 1024, steps=fit_result.steps, tokens=fit_result.tokens,
        device=str(device),
    )

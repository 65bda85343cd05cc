"""The ``legolm pretrain`` job: train a small model from scratch on real text, evaluate it, sample from it.

Its settings are `legolm.train.config.TrainConfig`. Bad input is caught before the run directory
is created; the run directory gets ``config.yaml``, metrics, ``loss.png``, ``checkpoints/`` (for
``--resume``), ``model/`` (a legolm checkpoint that ``legolm generate`` and ``legolm eval ppl``
load) and ``summary.json``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from legolm.errors import ConfigError
from legolm.train.config import TrainConfig
from legolm.train.metrics import format_loss
from legolm.utils.io import atomic_write_text, finite_json


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Check everything, prepare the data, `fit`, evaluate, save and sample; return the summary."""
    import torch

    from legolm.data.tokenized import check_fits, prepare_corpus
    from legolm.generation import GenerationConfig
    from legolm.train.batches import WindowBatches
    from legolm.train.distributed import init_distributed
    from legolm.train.fit import fit
    from legolm.train.run_dir import check_run_dir, hold_run_dir

    cfg.validate()
    gen = GenerationConfig(max_new_tokens=cfg.sample.max_new_tokens, temperature=cfg.sample.temperature,
                           top_k=cfg.sample.top_k, seed=cfg.sample.seed)
    gen.validate()
    inputs = [cfg.model.init, cfg.data.source, cfg.data.tokenizer, cfg.data.cache_dir]
    check_run_dir(cfg.run.out_dir, cfg.run.overwrite, cfg.run.resume, inputs)
    dist = init_distributed(cfg.run)  # under torchrun: join the job (one rank per GPU)
    with dist.main_first():  # rank 0 tokenizes and caches, the others read the cache
        corpus = prepare_corpus(cfg.data, progress=cfg.run.progress)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, corpus.vocab_size, corpus.eos_id, corpus.tokenizer.bos_id)
    check_fits(corpus, model.config, cfg.window)
    train = WindowBatches(corpus.train, cfg.window, cfg.batch_size, shuffle=True, seed=cfg.run.seed, **dist.shard())
    val = WindowBatches(corpus.val, cfg.window, cfg.eval_batch_size, shuffle=False,
                        drop_last=False, **dist.shard())
    if not dist.is_main:  # rank 0 holds the run directory, evaluates, saves and samples
        fit(model, train, cfg, val=val)
        return {}
    with hold_run_dir(cfg.run.out_dir, cfg.run.overwrite, cfg.run.resume, inputs) as run_dir:
        result = fit(model, train, cfg, val=val)
        return finish(cfg, model, corpus, result, gen, run_dir)


def finish(cfg: TrainConfig, model: Any, corpus: Any, result: Any, gen: Any, run_dir: Path) -> dict[str, Any]:
    """Held-out perplexity, the saved model, the sample and ``summary.json`` of a trained run."""
    from legolm.checkpoints.native import save_checkpoint
    from legolm.eval.perplexity import sliding_window_ppl
    from legolm.generation import generate_text

    model.eval()
    device = next(model.parameters()).device
    stride = cfg.eval.final_stride or max(1, cfg.window // 2)
    counts = corpus.counts("val")
    final = sliding_window_ppl(model, corpus.val, cfg.window, stride, cfg.eval_batch_size, device,
                               n_bytes=counts["bytes"], n_words=counts["words"], progress=cfg.run.progress)
    save_checkpoint(model, run_dir / "model", corpus.tokenizer, overwrite=True)
    sample = generate_text(model, corpus.tokenizer, [cfg.sample.prompt], gen)[0] if cfg.sample.prompt else ""
    check = cfg.eval.ppl_bands.check("held-out", final.ppl, model.config.vocab_size)
    summary = {"fit": {k: v for k, v in asdict(result).items() if k != "run_dir"},
               "final": final.to_dict(), "ppl_check": check.to_dict(), "sample": sample,
               "model": str(run_dir / "model")}
    atomic_write_text(run_dir / "summary.json", finite_json(summary, f"{run_dir / 'summary.json'}", indent=2))
    print(report(result.evals, final, check.message, sample, cfg, run_dir))
    return summary


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int, bos_id: int | None) -> Any:
    """A new `TransformerLM` from the preset and overrides, or the checkpoint ``model.init``."""
    from legolm.checkpoints.loader import load_pretrained
    from legolm.model.transformer import TransformerLM

    if cfg.model.init is None:
        return TransformerLM(cfg.model.model_config(vocab_size, eos_id, bos_id))
    if cfg.model.overrides():
        raise ConfigError(f"model.init starts from a checkpoint whose sizes are fixed; drop the overrides "
                          f"{sorted(cfg.model.overrides())}")
    return load_pretrained(cfg.model.init).float().train()


def report(evals: list[dict[str, float]], final: Any, check: str, sample: str, cfg: TrainConfig, run_dir: Path) -> str:
    """The evaluation table, the held-out sliding-window perplexity with its sanity ``check`` line, the sample."""
    lines = ["", "| step | train loss | val loss | val ppl |", "|---:|---:|---:|---:|"]
    for row in evals:
        lines.append(f"| {int(row['step']):,} | {format_loss(row['train_loss'])} | {row['val_loss']:.4f} | "
                     f"{row['val_ppl']:.2f} |")
    extra = ""
    if final.bits_per_byte is not None and final.word_ppl is not None:
        extra = f", {final.bits_per_byte:.3f} bits/byte, word ppl {final.word_ppl:.2f}"
    lines += ["", f"held-out sliding-window perplexity (window {final.max_length}, stride {final.stride}, "
              f"{final.n_tokens:,} tokens): {final.ppl:.2f}{extra}", check]
    if sample:
        lines += ["", f"sample: {cfg.sample.prompt}{sample}"]
    lines += ["", f"model saved to {run_dir / 'model'} (legolm generate --model {run_dir / 'model'} ...)"]
    return "\n".join(lines)

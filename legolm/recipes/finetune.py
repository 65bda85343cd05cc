"""The ``legolm finetune`` job: LoRA, Skip2-LoRA or full fine-tuning of a pretrained model on real text,
through `fit`, with its settings (`FinetuneConfig`).

The held-out sliding-window perplexity is measured before and after training with the same
windows. The run directory gets ``adapter/`` (peft format: ``peft.PeftModel.from_pretrained``
loads it), ``model/`` (the merged model with ``save_merged``, or the fully fine-tuned one) and
``summary.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from legolm.adapters.inject import LoRAConfig
from legolm.adapters.skip2lora import HEAD_GRADS, HeadGrad, Skip2LoRAConfig
from legolm.adapters.skip_cache import SkipCacheConfig
from legolm.data.tokenized import DataConfig
from legolm.data.tokenizer import MODEL_TOKENIZER, Tokenizer
from legolm.errors import ConfigError
from legolm.train.config import FitConfig, OptimConfig, RunConfig, SampleConfig
from legolm.train.metrics import format_loss
from legolm.utils.io import atomic_write_text, finite_json

if TYPE_CHECKING:
    import torch

    from legolm.adapters.skip2lora import Skip2LoRAModel
    from legolm.data.tokenized import TokenizedCorpus
    from legolm.eval.perplexity import PPLResult
    from legolm.model.transformer import TransformerLM



@dataclass
class FinetuneConfig(FitConfig):
    """``legolm finetune``: `FitConfig` plus the base model, the method, the data and the outputs.

    Attributes:
        method: lora (adapters on the frozen base), skip2lora (block outputs to the head) or full (every weight trains).
        model: Base model: legolm/HF directory, .gguf file or hub name.
        lora: LoRA targets and sizes (method lora).
        skip2lora: Skip2-LoRA block indices and sizes (method skip2lora). For pretrained bases ``tap_norm``
            defaults to ``final`` (the paper's raw taps, `Skip2LoRAConfig`'s default, diverge on SmolLM2; the
            search in docs/results/skip2lora.md picked final norm taps of every third block).
        skip_cache: Skip-Cache of the frozen backbone's features (method skip2lora).
        head_grad: Skip2-LoRA: how the adapters' gradients go through the frozen head (`Skip2LoRALoss`): auto
            (default: at the adapters' rank R = K·r where 4R <= n_embd, `legolm.train.low_rank_head`), low-rank
            or chain (through the head-input gradient). The same gradients; only the work differs.
        data: Corpus, tokenizer (model = the base model's own) and split.
        save_merged: With LoRA, also save the merged model (a plain legolm checkpoint) in model/.
        eval_tokens: Held-out tokens scored by the before/after perplexity (None: the whole val split).
        sample: Text sample printed after training (empty prompt = none).
    """

    method: Literal["lora", "skip2lora", "full"] = "lora"
    model: str = ""
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(r=8, alpha=16.0, target_modules=["all-linear"]))
    skip2lora: Skip2LoRAConfig = field(default_factory=lambda: Skip2LoRAConfig(block_indices=[], tap_norm="final"))
    skip_cache: SkipCacheConfig = field(default_factory=SkipCacheConfig)
    head_grad: HeadGrad = "auto"
    data: DataConfig = field(default_factory=lambda: DataConfig(tokenizer=MODEL_TOKENIZER))
    save_merged: bool = False
    eval_tokens: int | None = None
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(prompt=""))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0))
    run: RunConfig = field(default_factory=lambda: RunConfig(out_dir="runs/finetune"))

    def validate(self) -> None:
        super().validate()
        if not self.model:
            raise ConfigError("no base model: give --model PATH_OR_NAME (a legolm/HF directory, .gguf or hub name)")
        if self.method == "lora":
            self.lora.validate()
        if self.method == "skip2lora":
            self.skip_cache.validate()
            if self.head_grad not in HEAD_GRADS:
                raise ConfigError(f"head_grad must be one of {', '.join(HEAD_GRADS)}, got {self.head_grad!r}")
            if self.head_grad == "low-rank" and self.skip2lora.lora_head:
                raise ConfigError("head_grad low-rank needs a frozen LM head, but skip2lora.lora_head trains it: "
                                  "use --head-grad auto or chain")
            if self.run.activation_checkpointing != "none":
                raise ConfigError(f"--run.activation-checkpointing {self.run.activation_checkpointing} does nothing "
                                  "for Skip2-LoRA: its backbone runs without autograd (nothing is kept for backward) "
                                  "and the adapters sit outside the blocks; use --run.activation-checkpointing none")
        if self.eval_tokens is not None and self.eval_tokens < 2:
            raise ConfigError(f"eval_tokens must be >= 2 (or None for the whole val split), got {self.eval_tokens}")
        self.data.validate()
        self.sample.validate()


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Check everything, load the base and the data, measure, `fit`, measure again, save; return the summary."""
    import torch

    from legolm.adapters import inject_lora, trainable_report
    from legolm.adapters.skip2lora import Skip2LoRAModel
    from legolm.adapters.skip2lora_train import Skip2LoRALoss, SkipCacheFlush, build_skip_cache
    from legolm.checkpoints.loader import load, load_pretrained
    from legolm.data.tokenized import check_fits, prepare_corpus
    from legolm.train.batches import WindowBatches
    from legolm.train.callbacks import EpochTimer
    from legolm.train.distributed import init_distributed
    from legolm.train.fit import Callback, fit
    from legolm.train.run_dir import check_run_dir, hold_run_dir

    cfg.validate()
    inputs = [cfg.model, cfg.data.source, cfg.data.tokenizer, cfg.data.cache_dir, cfg.skip_cache.dir]
    check_run_dir(cfg.run.out_dir, cfg.run.overwrite, cfg.run.resume, inputs)
    dist = init_distributed(cfg.run)  # under torchrun: join the job (one rank per GPU)
    device = dist.run_device(cfg.run.device)
    tokenizer: Tokenizer | None = None
    if cfg.data.tokenizer == MODEL_TOKENIZER:  # the base model's own: read with it
        model, tokenizer = load(cfg.model)
    else:
        model = load_pretrained(cfg.model)
    model = model.float()  # fp32 weights; bf16 compute comes from run.precision
    data_cfg = dataclasses.replace(cfg.data, tokenizer=cfg.model) if tokenizer is not None else cfg.data
    with dist.main_first():  # rank 0 tokenizes and caches, the others read the cache
        corpus = prepare_corpus(data_cfg, progress=cfg.run.progress, tokenizer=tokenizer)
    check_fits(corpus, model.config, cfg.window)
    torch.manual_seed(cfg.run.seed)
    loss_fn: Skip2LoRALoss | None = None
    callbacks: list[Callback] = []
    epochs = EpochTimer(device)
    if cfg.method == "lora":  # B = 0: the adapted model computes exactly what the base does
        inject_lora(model, cfg.lora)
        print(trainable_report(model).format(per_module=False))
    model.to(device)
    train = WindowBatches(corpus.train, cfg.window, cfg.batch_size, shuffle=True, seed=cfg.run.seed, **dist.shard())
    if cfg.method == "skip2lora":  # B = 0 here too
        skip = Skip2LoRAModel(model, cfg.skip2lora)
        print(skip.report())
        cache = None
        if cfg.skip_cache.enabled:
            rank_dir = f"rank-{dist.rank}" if dist.world_size > 1 else ""  # each rank caches the windows it meets
            cache = build_skip_cache(skip, corpus.train, train.n_windows, cfg.window, cfg.skip_cache, device, rank_dir)
            callbacks.append(SkipCacheFlush(cache))
        loss_fn = Skip2LoRALoss(cache, cfg.loss_chunk_tokens, cfg.resolved_loss_kernel(), cfg.loss_vocab_chunk,
                                cfg.head_grad)
    trained: TransformerLM | Skip2LoRAModel = skip if cfg.method == "skip2lora" else model
    before = held_out_ppl(trained, corpus, cfg, device) if dist.is_main else None
    if before is not None:
        print(f"held-out perplexity before fine-tuning: {before.ppl:.3f} ({before.n_tokens:,} tokens)")
    val = WindowBatches(corpus.val, cfg.window, cfg.eval_batch_size, shuffle=False,
                        drop_last=False, **dist.shard())
    if before is None:  # ranks > 0: rank 0 holds the run directory, measures, saves and reports
        fit(trained, train, cfg, val=val, loss_fn=loss_fn, callbacks=[*callbacks, epochs])
        return {}
    with hold_run_dir(cfg.run.out_dir, cfg.run.overwrite, cfg.run.resume, inputs):
        result = fit(trained, train, cfg, val=val, loss_fn=loss_fn, callbacks=[*callbacks, epochs])
        return finish(cfg, trained, model, corpus, result, before, epochs, device)


def finish(cfg: FinetuneConfig, trained: TransformerLM | Skip2LoRAModel, model: TransformerLM, corpus: TokenizedCorpus,
           result: Any, before: PPLResult, epochs: Any, device: torch.device) -> dict[str, Any]:
    """Held-out perplexity after training, the adapter / merged model, the sample and ``summary.json``."""
    from legolm.adapters import merge_and_unload, save_adapter
    from legolm.adapters.skip2lora import Skip2LoRAModel, save_skip2lora
    from legolm.checkpoints.native import save_checkpoint

    trained.eval()
    after = held_out_ppl(trained, corpus, cfg, device)
    run_dir = Path(cfg.run.out_dir)
    outputs: dict[str, str] = {}
    if isinstance(trained, Skip2LoRAModel):
        outputs["adapter"] = str(save_skip2lora(trained, run_dir / "adapter", overwrite=True))
    elif cfg.method == "lora":
        outputs["adapter"] = str(save_adapter(model, run_dir / "adapter", cfg.lora, overwrite=True))
    sample = _sample(model, corpus, cfg) if cfg.method != "skip2lora" else ""  # generation needs a TransformerLM
    if cfg.method == "full" or (cfg.save_merged and cfg.method == "lora"):
        plain = merge_and_unload(model) if cfg.method == "lora" else model
        outputs["model"] = str(save_checkpoint(plain, run_dir / "model", corpus.tokenizer, overwrite=True))
    checks = [cfg.eval.ppl_bands.check(label, r.ppl, model.config.vocab_size)
              for label, r in (("held-out before", before), ("held-out after", after))]
    summary = {"method": cfg.method, "base_model": cfg.model, "before": before.to_dict(), "after": after.to_dict(),
               "ppl_check": {c.label: c.to_dict() for c in checks},
               "fit": {k: v for k, v in dataclasses.asdict(result).items() if k != "run_dir"},
               "epochs": [dataclasses.asdict(r) for r in epochs.records], "outputs": outputs, "sample": sample}
    atomic_write_text(run_dir / "summary.json", finite_json(summary, f"{run_dir / 'summary.json'}", indent=2))
    print(report(result.evals, before, after, [c.message for c in checks], outputs, cfg, sample))
    return summary


def held_out_ppl(model: TransformerLM | Skip2LoRAModel, corpus: TokenizedCorpus, cfg: FinetuneConfig,
                 device: torch.device) -> PPLResult:
    """Sliding-window perplexity of the validation split (or its first ``eval_tokens``), same windows every time."""
    from legolm.eval.perplexity import sliding_window_ppl

    ids, counts = corpus.val, corpus.counts("val")
    if cfg.eval_tokens is not None and cfg.eval_tokens < len(ids):
        ids, counts = ids[: cfg.eval_tokens], {}
    stride = cfg.eval.final_stride or max(1, cfg.window // 2)
    was_training = model.training
    model.eval()
    result = sliding_window_ppl(model, ids, cfg.window, stride, cfg.eval_batch_size, device,
                                n_bytes=counts.get("bytes"), n_words=counts.get("words"),
                                progress=cfg.run.progress)
    model.train(was_training)
    return result


def _sample(model: TransformerLM, corpus: TokenizedCorpus, cfg: FinetuneConfig) -> str:
    if not cfg.sample.prompt:
        return ""
    from legolm.generation import GenerationConfig, generate_text

    s = cfg.sample
    gen = GenerationConfig(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, seed=s.seed)
    return generate_text(model, corpus.tokenizer, [s.prompt], gen)[0]


def report(evals: list[dict[str, float]], before: PPLResult, after: PPLResult, checks: list[str],
           outputs: dict[str, str], cfg: FinetuneConfig, sample: str) -> str:
    """The evaluation table, held-out perplexity before/after with their sanity ``checks``, and the outputs."""
    lines = ["", "| step | train loss | val loss | val ppl |", "|---:|---:|---:|---:|"]
    lines += [f"| {int(r['step']):,} | {format_loss(r['train_loss'])} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} |"
              for r in evals]
    lines += ["", f"held-out sliding-window perplexity (window {after.max_length}, stride {after.stride}, "
              f"{after.n_tokens:,} tokens): before {before.ppl:.3f} -> after {after.ppl:.3f} "
              f"({100 * (after.ppl / before.ppl - 1):+.1f}%)", *checks]
    if sample:
        lines += ["", f"sample: {cfg.sample.prompt}{sample}"]
    lines += [f"{name} saved to {path}" for name, path in outputs.items()]
    return "\n".join(lines)

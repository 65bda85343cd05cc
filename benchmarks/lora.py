"""LoRA fine-tuning throughput and peak memory: legolm vs peft, same weights, same batches, same process.

The model is an HF-shaped GPT-2 (random weights of the real 124M shape, shared by both libraries:
legolm is built from the transformers model's state dict, and its LoRA A matrices are copied from
peft's so both start identically). Both train r=8 LoRA on c_attn + c_proj (attention and MLP
projections, as peft matches them) on windows of real text (Tiny Shakespeare from ``.bench/``):
base weights in bf16, adapter weights fp32 (peft's default), bf16 autocast, next-token
cross-entropy on fp32 logits, gradient clipping 1.0 and AdamW (fused on CUDA) over the adapter
parameters only. peft runs the usual eager transformers forward; legolm runs `fit`'s `TrainStep`
(eager and compiled). tok/s = trained tokens / wall time over the timed steps (warm-up excluded).

    python benchmarks/prepare_data.py                  # once, where the shared data is
    python -m benchmarks.lora                          # GPU: gpt2, batch 16 x 1024
    python -m benchmarks.lora --smoke                  # CPU: a tiny GPT-2, 2 steps, checks nothing crashes
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import device_info, print_table, real_tokens, write_result
from legolm.adapters import LoRAConfig, adapter_layers, inject_lora
from legolm.adapters.inject import hf_family, hf_module_names
from legolm.checkpoints.hf import GPT2, convert_state, export_hf_state
from legolm.core.config import ModelConfig
from legolm.model.transformer import TransformerLM
from legolm.train.batches import Batch
from legolm.train.config import OptimConfig, ScheduleConfig
from legolm.train.fit import NextTokenLoss, TrainStep, autocast_for
from legolm.train.optim import LRSchedule, build_optimizer

StepFn = Callable[[Batch, int], torch.Tensor]


def hf_model(preset: str) -> Any:
    """A transformers GPT-2 with random weights of the preset's shape (fp32, CPU)."""
    import transformers

    config = ModelConfig.from_name(preset)
    hf_cfg, _ = export_hf_state(config, TransformerLM(config).state_dict())
    hf_cfg.pop("model_type")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_cfg))


def batches(vocab: int, n: int, batch: int, seq: int) -> list[Batch]:
    """``n`` batches of real-text windows (inputs and next-token labels), the same for every run."""
    ids = real_tokens("gpt2").astype(np.int64) % vocab
    need = n * batch * (seq + 1)
    if need > len(ids):
        ids = np.tile(ids, need // len(ids) + 1)
    w = torch.from_numpy(ids[:need]).view(n, batch, seq + 1)
    return [{"input_ids": b[:, :-1].contiguous(), "labels": b[:, 1:].contiguous()} for b in w]


def optim_config(lr: float) -> OptimConfig:
    """The AdamW settings both libraries train with."""
    return OptimConfig(lr=lr, weight_decay=0.0, grad_clip=1.0)


def peft_step(model: Any, lr: float, device: torch.device, autocast: Any) -> StepFn:
    """The usual peft training step: eager forward, fp32-logit CE, backward, clip, fused AdamW."""
    params = [p for p in model.parameters() if p.requires_grad]
    o = optim_config(lr)
    opt = torch.optim.AdamW(params, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                            fused=device.type == "cuda")

    def step(batch: Batch, i: int) -> torch.Tensor:
        x, y = batch["input_ids"].to(device, non_blocking=True), batch["labels"].to(device, non_blocking=True)
        with autocast:
            logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def restorer(model: TransformerLM) -> Callable[[], TransformerLM]:
    """A function that puts the trainable weights back to their values now and returns the model."""
    start = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def restore() -> TransformerLM:
        with torch.no_grad():
            for p, p0 in zip([p for p in model.parameters() if p.requires_grad], start, strict=True):
                p.copy_(p0)
        return model

    return restore


def legolm_step(model: TransformerLM, lr: float, device: torch.device, precision: str, compile: bool,
                loss_chunk: int = 0) -> StepFn:
    """`fit`'s own step: `TrainStep` with its optimizer (fused AdamW on CUDA over the trainable params)."""
    optim = optim_config(lr)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], optim, device)
    schedule = LRSchedule(lr, ScheduleConfig(warmup_steps=0, decay="constant"), total_steps=1)
    train = TrainStep(model, NextTokenLoss(loss_chunk), opt, schedule, optim.grad_clip,
                      autocast_for(device, precision), device, compile=compile)

    def step(batch: Batch, i: int) -> torch.Tensor:
        loss, _, _ = train([batch], i)
        return loss

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step: StepFn, data: list[Batch], warmup: int, device: torch.device) -> dict[str, Any]:
    """Run ``warmup`` untimed steps, then time the rest; peak memory over the whole run."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = [float(step(b, i)) for i, b in enumerate(data[:warmup])]
    sync(device)
    t0 = time.perf_counter()
    timed = [step(b, warmup + i) for i, b in enumerate(data[warmup:])]
    sync(device)
    seconds = time.perf_counter() - t0
    losses += [float(t) for t in timed]
    tokens = sum(b["labels"].numel() for b in data[warmup:])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"tok/s": tokens / seconds, "peak GB": peak, "loss first": losses[0], "loss last": losses[-1]}


def build_peft(base: Any, cfg: LoRAConfig, dtype: torch.dtype, device: torch.device) -> Any:
    import peft

    model = base.to(device, dtype)
    pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,  # type: ignore[arg-type]
                           target_modules=cfg.target_modules)
    return peft.get_peft_model(model, pcfg).train()


def build_ours(state: dict[str, torch.Tensor], preset: str, cfg: LoRAConfig, peft_model: Any, dtype: torch.dtype,
               device: torch.device) -> TransformerLM:
    """legolm from the same base weights, LoRA injected, A copied from peft (B is zero in both)."""
    config = ModelConfig.from_name(preset)
    ours = TransformerLM.from_state_dict(config, convert_state(state, GPT2, config, to_hf=False)).to(device, dtype)
    inject_lora(ours, cfg)
    theirs = dict(peft_model.named_modules())
    family = hf_family(config)
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            hf = hf_module_names(name, family)[0]
            layer.lora_A.copy_(theirs[f"base_model.model.{hf}"].lora_A["default"].weight)  # type: ignore[operator]
    return ours.train()


def run(name: str, make: Callable[[], StepFn], data: list[Batch], warmup: int, device: torch.device
        ) -> dict[str, Any]:
    print(f"  timing {name} ...", flush=True)
    try:
        return {"impl": name, **measure(make(), data, warmup, device)}
    except torch.cuda.OutOfMemoryError:
        return {"impl": name, "tok/s": float("nan"), "peak GB": float("nan"), "note": "out of memory"}
    finally:
        free(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="GPT-2 preset (gpt2, gpt2-medium)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", nargs="+", default=["c_attn", "c_proj"])
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also time legolm with torch.compile (default: on, off with --smoke)")
    parser.add_argument("--loss-chunk", type=int, default=4096,
                        help="also time legolm with the loss scored this many tokens at a time (0 = not)")
    parser.add_argument("--smoke", action="store_true", help="tiny GPT-2 on CPU, fp32, 2 steps: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.batch, args.seq, args.steps, args.warmup = "tiny-gpt2", 2, 32, 2, 1
        args.loss_chunk = min(args.loss_chunk, 16)
    args.compile = (not args.smoke) if args.compile is None else args.compile
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype, precision = (torch.float32, "fp32") if device.type == "cpu" else (torch.bfloat16, "bf16-mixed")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = LoRAConfig(r=args.r, alpha=args.alpha, target_modules=args.targets)
    base = hf_model(args.model)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    data = batches(base.config.vocab_size, args.warmup + args.steps, args.batch, args.seq)

    theirs = build_peft(base, cfg, dtype, device)
    ours = build_ours(state, args.model, cfg, theirs, dtype, device)
    n_trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert n_trainable == theirs.get_nb_trainable_parameters()[0], "legolm and peft adapt different modules"
    fresh_ours = restorer(ours)  # every legolm run starts from the same adapter weights as peft's

    autocast = autocast_for(device, precision)
    rows = [run("peft (eager)", lambda: peft_step(theirs, args.lr, device, autocast), data, args.warmup, device)]
    theirs = base = None  # free peft's model before legolm's runs (peak memory is per run)
    free(device)
    rows.append(run("legolm eager", lambda: legolm_step(fresh_ours(), args.lr, device, precision, False), data,
                    args.warmup, device))
    if args.compile:
        rows.append(run("legolm compile", lambda: legolm_step(fresh_ours(), args.lr, device, precision, True), data,
                        args.warmup, device))
    if args.loss_chunk:
        chunked = f"legolm {'compile' if args.compile else 'eager'} + chunked CE ({args.loss_chunk})"
        rows.append(run(chunked, lambda: legolm_step(fresh_ours(), args.lr, device, precision, args.compile,
                                                     args.loss_chunk), data, args.warmup, device))
    reference = rows[0]["tok/s"]
    for row in rows:
        row["vs peft"] = f"{row['tok/s'] / reference:.2f}x"
        for key in ("tok/s", "peak GB", "loss first", "loss last"):
            if key in row:
                row[key] = f"{row[key]:,.0f}" if key == "tok/s" else f"{row[key]:.2f}" if key == "peak GB" \
                    else f"{row[key]:.4f}"
    print(f"\nLoRA r={args.r} on {' '.join(args.targets)} ({n_trainable:,} trainable), {args.model}, batch "
          f"{args.batch} x {args.seq}, {precision}, {args.steps} timed steps after {args.warmup}, "
          f"{device_info()['device']}")
    table = print_table(rows, ["impl", "tok/s", "vs peft", "peak GB", "loss first", "loss last", "note"])
    if not args.smoke:
        path = write_result("lora", {**device_info(), "args": vars(args), "rows": rows, "table": table})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

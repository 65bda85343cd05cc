"""Pretraining throughput: legolm's training step vs Hugging Face `transformers`, same process.

For each model shape (gpt2 124M, pythia-160m) both libraries start from the same random weights
(HF's init, converted into legolm), train on the same real-text batches (TinyStories, GPT-2 /
GPT-NeoX tokenizer, from ``.bench/``), with the same step: bf16 autocast, fp32 master weights,
fused AdamW (decay on matrices), gradient clipping at 1.0, and the same next-token
cross-entropy on the logits. Only the model differs, eager or under `torch.compile`:

    legolm     legolm.train.fit.TrainStep (what `fit` runs) on a TransformerLM
    hf         the same TrainStep on transformers' GPT2LMHeadModel / GPTNeoXForCausalLM (SDPA attention)
    litgpt     the same TrainStep on litgpt's `GPT`, the weights through litgpt's own HF converter
               (``copy_weights_gpt_neox``); Pythia only (litgpt has no GPT-2: its rows read "not supported"),
               "not installed" without litgpt (see benchmarks/peers.py and the README's Benchmarks)
    chunked    legolm with the loss scored ``--loss-chunk`` tokens at a time (``loss_chunk_tokens``), each chunk's
               softmax step by ``--loss-kernel`` (``loss_kernel``: torch ops or the Triton kernel)

The vocabulary is padded to a multiple of 64 (50257 -> 50304, as nanoGPT does) for BOTH
libraries, so the comparison is between equal shapes. tok/s = batch x seq x steps / wall time
(after warmup, which includes compilation). MFU = achieved FLOP/s over the bf16 matmul rate
measured in this run (a large bf16 matmul); FLOPs per token = 6·N + 12·L·T·C (N = parameters
without the embeddings, plus the LM head's matmul; PaLM appendix B).

    python benchmarks/prepare_data.py                       # once, where the shared data is
    python -m benchmarks.pretrain                           # gpt2 and pythia-160m, 16 x 1024, bf16
    python -m benchmarks.pretrain --smoke                   # CPU, tiny shapes: checks that it runs
    python -m benchmarks.pretrain --models pythia-160m --variants hf compile litgpt compile legolm compile

``--smoke`` compiles with the ``aot_eager`` backend (inductor's C++ build would take longer than the run).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    BENCH_DATA,
    cycled,
    device_info,
    hf_random_model,
    legolm_copy,
    print_table,
    profile_line,
    profile_steps,
    write_result,
)
from benchmarks.peers import LITGPT, failure, litgpt_model, litgpt_unsupported, logits_loss, missing, train_step
from legolm.core.config import ModelConfig
from legolm.model.transformer import TransformerLM
from legolm.train.batches import Batch, WindowBatches
from legolm.train.config import OptimConfig, ScheduleConfig
from legolm.train.fit import LossOutput, NextTokenLoss
from legolm.train.optim import LRSchedule, build_optimizer
from legolm.utils.params import trainable_parameters

TOKENIZER = {"gpt2": "gpt2", "pythia-160m": "pythia", "tiny-gpt2": "gpt2", "tiny-pythia": "pythia"}
VARIANTS = ["hf eager", "hf compile", "litgpt eager", "litgpt compile", "legolm eager", "legolm compile",
            "legolm compile chunked"]


def hf_loss(model: nn.Module, batch: Batch) -> LossOutput:
    """The same next-token cross-entropy as `NextTokenLoss`, on a transformers model's logits."""
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V)
    labels = batch["labels"]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()), labels.numel(), {}


def padded_config(preset: str, vocab_multiple: int, overrides: dict[str, Any]) -> ModelConfig:
    """The preset with its vocabulary rounded up to a multiple of ``vocab_multiple``."""
    base = ModelConfig.from_name(preset, **overrides)
    vocab = -(-base.vocab_size // vocab_multiple) * vocab_multiple
    return ModelConfig.from_name(preset, **{**overrides, "vocab_size": vocab})


def build_model(library: str, config: ModelConfig, device: torch.device) -> nn.Module:
    """HF's randomly initialised model of ``config``'s shape, or legolm / litgpt holding the same weights; fp32,
    train."""
    hf = hf_random_model(config).to(device).train()
    if library == "hf":
        return hf
    if library == "litgpt":  # through litgpt's own converter
        return litgpt_model({k: v.detach().clone() for k, v in hf.state_dict().items()}, config).to(device).train()
    ours = legolm_copy(hf, config)
    del hf
    return ours.to(device).train()


def flops_per_token(config: ModelConfig, seq: int) -> float:
    """6·N + 12·L·T·C, N = non-embedding parameters + the LM head matmul (V·C, counted even when tied)."""
    with torch.device("meta"):
        model = TransformerLM(config)
    embeddings = {id(model.wte.weight), id(model.lm_head.weight)}
    if model.wpe is not None:
        embeddings.add(id(model.wpe.weight))
    unique = {id(p): p for p in model.parameters()}
    n = sum(p.numel() for i, p in unique.items() if i not in embeddings) + config.vocab_size * config.n_embd
    return 6 * n + 12 * config.n_layer * seq * config.n_embd


def matmul_flops(device: torch.device, n: int, dtype: torch.dtype, iters: int) -> float:
    """Measured FLOP/s of an n x n x n matmul (the peak that MFU is relative to)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return float(2 * n**3 * iters / (time.perf_counter() - t0))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def real_batches(preset: str, batch: int, seq: int, n: int, device: torch.device) -> list[Batch]:
    """``n`` batches of real-text windows (seeded shuffle), already on the device (cycled if too few)."""
    path = BENCH_DATA / f"tinystories_{TOKENIZER[preset]}.npy"
    if not path.is_file():
        raise SystemExit(f"missing {path}: run `python benchmarks/prepare_data.py` first (needs LEGOLM_DATA)")
    source = WindowBatches(np.load(path), seq, batch, shuffle=True, seed=0)
    return cycled(source, n, device)


def time_variant(model: nn.Module, loss_fn: Any, compile: bool, batches: list[Batch], warmup: int,
                 device: torch.device, autocast: bool, compile_mode: str, backend: str = "inductor",
                 profile: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """Warm up (compiling), then time ``len(batches) - warmup`` steps; peak memory of the whole run. ``profile``
    (steps, rows): then that many more steps under the profiler (`profile_steps`, after the peak is read)."""
    optim = OptimConfig(lr=6e-4, weight_decay=0.1, grad_clip=1.0)
    optimizer = build_optimizer(trainable_parameters(model), optim, device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    schedule = LRSchedule(optim.lr, ScheduleConfig(warmup_steps=warmup), len(batches))
    step = train_step(model, loss_fn, optimizer, schedule, optim.grad_clip, ctx, device, compile, backend, compile_mode)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warmup):
        step([batches[i]], i)
    sync(device)
    t1 = time.perf_counter()
    losses = [step([b], warmup + i)[0] for i, b in enumerate(batches[warmup:])]
    sync(device)
    seconds = time.perf_counter() - t1
    timed_steps = len(batches) - warmup
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    result: dict[str, Any] = {"seconds": seconds, "steps": timed_steps, "warmup_s": t1 - t0, "peak_gb": peak,
                              "first_loss": float(losses[0]), "last_loss": float(losses[-1])}
    n, rows = profile
    if n:
        more = [warmup + (i % timed_steps) for i in range(n)]
        result["profile"] = profile_steps(lambda i: step([batches[i]], len(batches) + i), more, device,
                                          1000 * seconds / timed_steps, rows)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2", "pythia-160m"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--vocab-multiple", type=int, default=64, help="pad the vocabulary to a multiple of this")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode for the compiled variants")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                        "aot_eager with --smoke)")
    parser.add_argument("--matmul-n", type=int, default=8192, help="size of the bf16 matmul that sets the peak")
    parser.add_argument("--loss-chunk", type=int, default=4096, help="tokens per loss chunk of the 'chunked' variant")
    parser.add_argument("--loss-kernel", choices=["torch", "triton"], default="torch",
                        help="the 'chunked' variant's softmax step (loss_kernel)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile this many more steps of each variant: device time by kind of kernel (0 = not)")
    parser.add_argument("--profile-rows", type=int, default=15, help="costliest kernels listed per profile")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, fp32, a few steps")
    args = parser.parse_args()
    overrides: dict[str, Any] = {}
    if args.smoke:
        args.models = [{"gpt2": "tiny-gpt2", "pythia-160m": "tiny-pythia"}.get(m, m) for m in args.models]
        args.batch, args.seq, args.steps, args.warmup, args.matmul_n, args.loss_chunk = 2, 64, 3, 2, 512, 32
        overrides = {"vocab_size": 50257}  # the real tokenizers' ids on the tiny shapes
        args.compile_backend = args.compile_backend or "aot_eager"
    args.compile_backend = args.compile_backend or "inductor"
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    autocast = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    peak = matmul_flops(device, args.matmul_n, torch.bfloat16 if autocast else torch.float32, 50 if autocast else 3)
    print(f"measured {'bf16' if autocast else 'fp32'} matmul rate: {peak / 1e12:,.3f} TFLOP/s", flush=True)
    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}  # "model variant" -> `profile_steps` (with --profile)
    default = parser.get_default("models")  # another choice of models writes its own file
    name = "pretrain" if args.models == default else "pretrain-" + "-".join(args.models)
    for preset in args.models:
        config = padded_config(preset, args.vocab_multiple, overrides)
        fpt = flops_per_token(config, args.seq)
        batches = real_batches(preset, args.batch, args.seq, args.warmup + args.steps, device)
        results: dict[str, dict[str, float]] = {}
        notes: dict[str, str] = {}
        for variant in args.variants:
            library, mode, *extra = variant.split()  # "chunked": the loss scored args.loss_chunk tokens at a time
            if library == "litgpt":
                why = missing(LITGPT) or litgpt_unsupported(config)
                if why:
                    notes[variant] = f"litgpt {why}"
                    print(f"{preset} {variant}: {notes[variant]}", flush=True)
                    continue
            loss_fn = {"hf": hf_loss, "litgpt": logits_loss}.get(library) or \
                NextTokenLoss(args.loss_chunk if "chunked" in extra else 0, args.loss_kernel)
            print(f"{preset}: timing {variant} ...", flush=True)
            try:
                model = build_model(library, config, device)
                r = time_variant(model, loss_fn, mode == "compile", batches, args.warmup, device, autocast,
                                 args.compile_mode, args.compile_backend, (args.profile, args.profile_rows))
            except Exception as err:  # a peer that breaks is a row saying so; legolm's and HF's failures raise
                if library != "litgpt":
                    raise
                notes[variant] = f"litgpt {failure(err)}"
                model = None
                torch._dynamo.reset()
                gc.collect()
                continue
            tok_s = args.batch * args.seq * r["steps"] / r["seconds"]
            results[variant] = {**r, "tok_s": tok_s, "mfu": tok_s * fpt / peak}
            print(f"{preset} {variant}: {tok_s:,.0f} tok/s, {r['peak_gb']:.1f} GB, MFU {100 * tok_s * fpt / peak:.1f}%,"
                  f" loss {r['first_loss']:.3f} -> {r['last_loss']:.3f} (warmup {r['warmup_s']:.0f} s)", flush=True)
            if "profile" in r:
                profiles[f"{preset} {variant}"] = r["profile"]
                print(f"{preset} {variant} profile, ms a step: {profile_line(r['profile'])}", flush=True)
            del model
            torch._dynamo.reset()  # drop compiled graphs (and the weights they hold) before the next variant
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base = results.get("hf eager")
        for variant in args.variants:
            if variant in notes:
                rows.append({"model": preset, "impl": variant, "note": notes[variant]})
                continue
            r = results[variant]
            rows.append({"model": preset, "impl": variant, "tok/s": f"{r['tok_s']:,.0f}",
                         "ms/step": f"{1000 * r['seconds'] / r['steps']:.1f}", "peak GB": f"{r['peak_gb']:.1f}",
                         "MFU": f"{100 * r['mfu']:.1f}%", "vs hf eager": f"{r['tok_s'] / base['tok_s']:.2f}x" if base
                         else "", "loss first->last": f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"})
        if not args.smoke:  # a run cut at the call's limit keeps the models measured so far
            write_result(name, {**device_info(), "args": vars(args), "matmul_tflops": peak / 1e12,
                                "complete": False, "rows": rows, "table": "", "profiles": profiles})
    print(f"\nPretraining step, batch {args.batch} x {args.seq} real-text tokens, "
          f"{'bf16 autocast, fused AdamW' if autocast else 'fp32, AdamW'}, {device_info()['device']}, "
          f"matmul peak {peak / 1e12:,.3f} TFLOP/s")
    table = print_table(rows, ["model", "impl", "tok/s", "ms/step", "peak GB", "MFU", "vs hf eager",
                               "loss first->last", "note"])
    if args.smoke:  # a crash check, not a measurement: nothing goes to benchmarks/results
        return
    path = write_result(name, {**device_info(), "args": vars(args), "matmul_tflops": peak / 1e12,
                               "complete": True, "rows": rows, "table": table, "profiles": profiles})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

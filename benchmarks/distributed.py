"""Scale-out throughput: 1 GPU vs N GPUs with DDP and FSDP2, legolm vs transformers' GPT-2, same process.

Every setting runs `fit`'s own training step (`TrainStep` through `legolm.train.distributed.Wrapped`:
DDP, or FSDP2 with each block sharded, then the root) on real TinyStories windows (GPT-2
tokenizer, ``.bench/``), each rank reading its own shard, batch B x T per GPU, bf16 autocast,
fp32 master weights, fused AdamW, gradient clipping. Within one launch both libraries are timed
one after the other from the same random weights (HF's init, converted into legolm, as in
`benchmarks.pretrain`): legolm's `TransformerLM` and transformers' `GPT2LMHeadModel` (SDPA).

    launch        ranks   strategy
    single        1       none   (plain process: the baseline)
    ddp           N       ddp    (torchrun --standalone --nproc_per_node N)
    fsdp2         N       fsdp2

tok/s counts the tokens of all ranks (N x B x T x steps / wall time after warmup, ranks
synchronised at start and end). Scaling efficiency = tok/s(N GPUs) / (N x tok/s(1 GPU)), per
library, activation checkpointing and eager/compiled variant; "peak vs 1 GPU" = rank 0's peak
CUDA memory over the single GPU's, same variant (FSDP2's goal for the 1B-class model: <= 60%).

Each launch times every variant one after the other, from fresh weights: ``--activation-checkpointing
none blocks selective`` (`legolm.train.activation_checkpointing`, applied through `Wrapped` to
both libraries' blocks alike) and, with ``--compile``, the compiled step beside the eager one.
The batches are TinyStories in GPT-2 tokens: a preset with a smaller vocabulary (tinyllama-1.1b:
Llama 2's 32,000) gets GPT-2's, padded, so every token id is a row (the table prints the count).

    python benchmarks/prepare_data.py                    # once, where the shared data is
    python -m benchmarks.distributed                     # gpt2 124M, 16 x 1024 per GPU, all visible GPUs
    python -m benchmarks.distributed --model tinyllama-1.1b --batch 8 --activation-checkpointing none blocks --compile
    python -m benchmarks.distributed --smoke             # CPU, gloo, 2 processes, tiny shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch

from benchmarks.common import BENCH_DATA, cycled, device_info, print_table, write_result
from benchmarks.pretrain import build_model, hf_loss, padded_config
from legolm.core.config import ModelConfig
from legolm.model.transformer import TransformerLM
from legolm.train.activation_checkpointing import MODES, ActivationCheckpointing
from legolm.train.batches import Batch, WindowBatches
from legolm.train.config import OptimConfig, RunConfig, ScheduleConfig
from legolm.train.distributed import DistContext, Wrapped, init_distributed, teardown
from legolm.train.fit import NextTokenLoss, TrainStep, autocast_for
from legolm.train.optim import LRSchedule, build_optimizer
from legolm.utils.params import trainable_parameters

LAUNCHES: dict[str, Literal["none", "ddp", "fsdp2"]] = {"single": "none", "ddp": "ddp", "fsdp2": "fsdp2"}
LIBRARIES = ["legolm", "hf"]
CORPUS = "tinystories_gpt2.npy"
STEP_MODES = ["eager", "compiled"]
CORPUS_VOCAB = 50257  # GPT-2's token ids: the smallest vocabulary the batches fit


def rank_batches(ctx: DistContext, batch: int, seq: int, n: int) -> list[Batch]:
    """``n`` batches of this rank's shard of the real-text windows, on its device (cycled if too few)."""
    path = BENCH_DATA / CORPUS
    if not path.is_file():
        raise SystemExit(f"missing {path}: run `python benchmarks/prepare_data.py` first (needs LEGOLM_DATA)")
    source = WindowBatches(np.load(path), seq, batch, shuffle=True, seed=0, **ctx.shard())
    return cycled(source, n, ctx.device)


def sync(ctx: DistContext) -> None:
    """Wait for this rank's device, then for every rank."""
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    ctx.barrier()


def bench_config(args: argparse.Namespace) -> ModelConfig:
    """The preset, its vocabulary raised to the corpus's (GPT-2's) where smaller and padded to ``vocab_multiple``."""
    preset = ModelConfig.from_name(args.model)
    overrides = {"vocab_size": CORPUS_VOCAB} if preset.vocab_size < CORPUS_VOCAB else {}
    return padded_config(args.model, args.vocab_multiple, overrides)


def parameters(config: ModelConfig) -> int:
    """Parameters of a `TransformerLM` of ``config``, counted on the meta device."""
    with torch.device("meta"):
        return TransformerLM(config).num_parameters()


def variants(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
    """(library, activation checkpointing, compiled) of every timed row of a launch, in order."""
    modes = [m == "compiled" for m in (STEP_MODES if args.compile else args.modes)]
    return [(lib, ac, compiled) for lib in args.libraries for ac in args.activation_checkpointing
            for compiled in modes]


def variant_key(library: str, ac: str, compiled: bool) -> str:
    return f"{library}|{ac}|{'compiled' if compiled else 'eager'}"


def time_library(library: str, ctx: DistContext, run: RunConfig, args: argparse.Namespace,
                 batches: list[Batch], compiled: bool = False) -> dict[str, float]:
    """Warm up, then time the steps of one library's model under ``run.strategy`` (and its activation checkpointing)."""
    config = bench_config(args)
    build_on = torch.device("cpu") if run.strategy == "fsdp2" else ctx.device  # FSDP2 shards a host copy
    model = build_model(library, config, build_on)
    wrapped = Wrapped(model, ctx, run)
    optim = OptimConfig(lr=6e-4, weight_decay=0.1, grad_clip=1.0)
    optimizer = build_optimizer(trainable_parameters(wrapped.model), optim, ctx.device)
    schedule = LRSchedule(optim.lr, ScheduleConfig(warmup_steps=args.warmup), len(batches))
    loss_fn = hf_loss if library == "hf" else NextTokenLoss()
    step = TrainStep(model, loss_fn, optimizer, schedule, optim.grad_clip, autocast_for(ctx.device, run.precision),
                     ctx.device, compiled, "default", wrapped)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step([batches[i]], i)
    sync(ctx)
    t1 = time.perf_counter()
    losses = [step([b], args.warmup + i)[0] for i, b in enumerate(batches[args.warmup:])]
    sync(ctx)
    seconds = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else float("nan")
    mean_loss = ctx.all_reduce_sum(torch.stack([losses[0], losses[-1]]).double()) / ctx.world_size
    del step, optimizer, wrapped, model
    gc.collect()
    torch.compiler.reset()  # the next variant compiles its own model
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    return {"tok_s": ctx.world_size * args.batch * args.seq * args.steps / seconds, "seconds": seconds,
            "warmup_s": t1 - t0, "peak_gb": peak, "first_loss": float(mean_loss[0]), "last_loss": float(mean_loss[1])}


def worker(args: argparse.Namespace) -> None:
    """One launch (plain process or torchrun rank): time each library; rank 0 writes ``args.result``."""
    base = RunConfig(strategy=LAUNCHES[args.launch], device="cpu" if args.smoke else "auto",
                     precision="fp32" if args.smoke else "bf16-mixed")
    ctx = init_distributed(base)
    if not ctx.distributed:
        ctx = DistContext(device=torch.device("cpu" if args.smoke else "cuda"))
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    batches = rank_batches(ctx, args.batch, args.seq, args.warmup + args.steps)
    results = {}
    for lib, ac, compiled in variants(args):
        run = dataclasses.replace(base, activation_checkpointing=cast(ActivationCheckpointing, ac))
        results[variant_key(lib, ac, compiled)] = time_library(lib, ctx, run, args, batches, compiled)
    if ctx.is_main:
        Path(args.result).write_text(json.dumps({"world_size": ctx.world_size, "results": results}))
    teardown(wait=True)


def launch(launch: str, nproc: int, args: argparse.Namespace, argv: list[str], out: Path) -> dict[str, Any]:
    """Run one launch in a child process (under torchrun when distributed) and read its results."""
    result = out / f"{launch}.json"
    tail = [*argv, "--worker", "--launch", launch, "--result", str(result)]
    if launch == "single":
        cmd = [sys.executable, "-m", "benchmarks.distributed", *tail]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "benchmarks.distributed", *tail]
    print(f"{launch}: {' '.join(cmd[1:5])} ... ({nproc if launch != 'single' else 1} process(es))", flush=True)
    proc = subprocess.run(cmd, timeout=args.timeout)
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(f"the {launch} launch failed (exit code {proc.returncode})")
    data: dict[str, Any] = json.loads(result.read_text())
    return data


def report(found: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, str]]:
    """One row per launch and variant: throughput, scaling efficiency and peak memory against the single GPU."""
    rows = []
    nan = {"tok_s": float("nan"), "peak_gb": float("nan")}
    for launch, data in found.items():
        n = data["world_size"]
        for key, r in data["results"].items():
            lib, ac, mode = key.split("|")
            single = found["single"]["results"].get(key, nan) if "single" in found else nan
            eff = r["tok_s"] / (n * single["tok_s"])
            rows.append({"impl": lib, "launch": launch, "GPUs": str(n), "act. ckpt": ac, "step": mode,
                         "tok/s": f"{r['tok_s']:,.0f}", "tok/s per GPU": f"{r['tok_s'] / n:,.0f}",
                         "scaling eff.": f"{100 * eff:.1f}%", "peak GB (rank 0)": f"{r['peak_gb']:.1f}",
                         "peak vs 1 GPU": f"{100 * r['peak_gb'] / single['peak_gb']:.0f}%",
                         "loss first->last": f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="legolm preset (the HF peer gets the same shape)")
    parser.add_argument("--batch", type=int, default=16, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--nproc", type=int, default=None, help="GPUs of the distributed launches (default: all)")
    parser.add_argument("--launches", nargs="+", default=list(LAUNCHES), choices=list(LAUNCHES))
    parser.add_argument("--libraries", nargs="+", default=LIBRARIES, choices=LIBRARIES)
    parser.add_argument("--vocab-multiple", type=int, default=64, help="pad the vocabulary to a multiple of this")
    parser.add_argument("--modes", nargs="+", default=["eager"], choices=STEP_MODES,
                        help="the training step eager and/or under torch.compile: one row per mode")
    parser.add_argument("--compile", action="store_true", help="short for --modes eager compiled")
    parser.add_argument("--tag", default="", help="result file benchmarks/results/distributed-TAG-DATE.json")
    parser.add_argument("--activation-checkpointing", nargs="+", default=["none"], choices=list(MODES),
                        help="activation checkpointing of the blocks: one row per mode (run.activation_checkpointing)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, 2 processes, tiny-gpt2, a few steps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--launch", choices=list(LAUNCHES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.model, args.batch, args.seq, args.steps, args.warmup = "tiny-gpt2", 2, 64, 3, 1
    if args.worker:
        worker(args)
        return
    nproc = args.nproc or (2 if args.smoke else torch.cuda.device_count())
    if nproc < 2 and not args.smoke:
        raise SystemExit(f"{nproc} GPU(s) visible: the distributed launches need >= 2 (or use --smoke on CPU)")
    argv = list(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        found = {name: launch(name, nproc, args, argv, Path(tmp)) for name in args.launches}
    rows = report(found, args)
    config = bench_config(args)
    print(f"\nTraining step of {args.model} ({parameters(config) / 1e9:.3f} B parameters, vocabulary "
          f"{config.vocab_size:,}), batch {args.batch} x {args.seq} real-text tokens per GPU, "
          f"{'fp32 on CPU (gloo)' if args.smoke else 'bf16 autocast (NCCL)'}, {args.steps} timed steps:\n")
    table = print_table(rows, list(rows[0]))
    if args.smoke:  # a crash check on CPU, not a measurement: nothing goes to benchmarks/results
        return
    payload = {**device_info(), "nproc": nproc, "args": {k: v for k, v in vars(args).items()
                                                         if k not in ("worker", "launch", "result")},
               "parameters": parameters(config), "vocab_size": config.vocab_size, "launches": found, "table": table}
    path = write_result("distributed" + (f"-{args.tag}" if args.tag else ""), payload)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

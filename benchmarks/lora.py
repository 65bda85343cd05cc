"""LoRA fine-tuning throughput and peak memory: legolm vs peft and litgpt, same weights, same batches, same process.

The model is an HF-shaped GPT-2 or Pythia (random weights of the real shape, ``--model gpt2`` or
``pythia-160m``, shared by every library: legolm is built from the transformers model's state
dict, litgpt through litgpt's own converter, and their LoRA A matrices are copied from peft's so all
start identically). All train r=8 LoRA on the same modules, by default peft's names c_attn + c_proj
on GPT-2 (attention and MLP projections, as peft matches them) and query_key_value + dense on
Pythia (the attention's), on windows of real text (Tiny Shakespeare from ``.bench/``, the model's
tokenizer): base weights in bf16, adapter weights fp32 (peft's default), bf16 autocast, next-token
cross-entropy on fp32 logits, gradient clipping 1.0 and AdamW (fused on CUDA) over the adapter
parameters only, every row through `fit`'s `TrainStep` (eager, or its loss call compiled):

    peft eager / peft compile      peft's model on transformers (SDPA attention)
    litgpt eager / litgpt compile  `litgpt.lora.GPT` (Pythia only: litgpt has no GPT-2). Its fused-QKV LoRA
                                   has one A per q, k and v (3x peft's A on query_key_value; each starts as
                                   peft's A), so it trains more parameters there: see "trainable"
    legolm eager / legolm compile  legolm's `inject_lora`; "+ chunked CE" scores the loss in chunks

A peer row reads "not installed" when its library cannot be imported (benchmarks/peers.py). Each
row's model is on the GPU only during its own run, so peak GB is that row's. tok/s = trained tokens
/ wall time over the timed steps (warm-up, where compilation happens, excluded).

    python benchmarks/prepare_data.py                  # once, where the shared data is
    python -m benchmarks.lora                          # GPU: gpt2, batch 16 x 1024
    python -m benchmarks.lora --model pythia-160m      # GPU: Pythia-160m, with the litgpt rows
    python -m benchmarks.lora --smoke                  # CPU: a tiny GPT-2, 2 steps, checks nothing crashes
    python -m benchmarks.lora --smoke --model pythia-160m   # CPU: a tiny Pythia, every row

``--smoke`` compiles with the ``aot_eager`` backend (inductor's C++ build would take longer than the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from benchmarks.common import (
    device_info,
    hf_random_model,
    print_table,
    profile_line,
    profile_steps,
    real_tokens,
    write_result,
)
from benchmarks.peers import (
    LITGPT,
    PEERS,
    adapters_to_fp32,
    copy_peft_lora,
    failure,
    hf_logits_loss,
    litgpt_model,
    litgpt_unsupported,
    logits_loss,
    missing,
    train_step,
)
from legolm.adapters import LoRAConfig, adapter_layers, inject_lora
from legolm.adapters.inject import hf_family, hf_module_names
from legolm.checkpoints.hf import convert_state, export_hf_state, family_for
from legolm.core.config import ModelConfig
from legolm.model.transformer import TransformerLM
from legolm.train.batches import Batch
from legolm.train.config import OptimConfig, ScheduleConfig
from legolm.train.fit import LossFn, NextTokenLoss, autocast_for
from legolm.train.head_loss import LossKernel
from legolm.train.optim import LRSchedule, build_optimizer

StepFn = Callable[[Batch, int], torch.Tensor]
M = TypeVar("M", bound=nn.Module)
TOKENIZER = {"gpt2": "gpt2", "gpt_neox": "pythia"}  # model_type -> the .bench text's tokenizer
DEFAULT_TARGETS = {"gpt2": ["c_attn", "c_proj"], "gpt_neox": ["query_key_value", "dense"]}
SMOKE_MODELS = {"gpt2": "tiny-gpt2", "pythia-160m": "tiny-pythia"}


def bench_config(preset: str, corpus: str | None = None) -> ModelConfig:
    """The preset's shape; with ``corpus`` (a prepared corpus directory, e.g. ``.bench/lego-gutenberg-bpe4096``)
    its vocabulary instead of the preset's: the same backbone with a small head."""
    config = ModelConfig.from_name(preset)
    if corpus is None:
        return config
    manifest = Path(corpus) / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"--corpus {corpus}: no manifest.json there; give a corpus directory prepared by "
                         "`python -m benchmarks.prepare_data` (e.g. .bench/lego-gutenberg-bpe4096)")
    return dataclasses.replace(config, vocab_size=int(json.loads(manifest.read_text())["vocab_size"]))


def text_tokens(kind: str, corpus: str | None = None) -> np.ndarray:
    """Real-text token ids: Tiny Shakespeare in the model type's tokenizer, or a corpus directory's training split."""
    return real_tokens(TOKENIZER[kind]) if corpus is None else np.load(Path(corpus) / "train.npy")


def model_type(config: ModelConfig) -> str:
    """The Hugging Face model_type of a legolm config (gpt2, gpt_neox, llama)."""
    with torch.device("meta"):
        shapes = TransformerLM(config).state_dict()
    return str(export_hf_state(config, shapes)[0]["model_type"])


def batches(vocab: int, n: int, batch: int, seq: int, tokens: np.ndarray) -> list[Batch]:
    """``n`` batches of real-text windows (inputs and next-token labels), the same for every run."""
    ids = tokens.astype(np.int64) % vocab
    need = n * batch * (seq + 1)
    if need > len(ids):
        ids = np.tile(ids, need // len(ids) + 1)
    w = torch.from_numpy(ids[:need]).view(n, batch, seq + 1)
    return [{"input_ids": b[:, :-1].contiguous(), "labels": b[:, 1:].contiguous()} for b in w]


def optim_config(lr: float) -> OptimConfig:
    """The AdamW settings both libraries train with."""
    return OptimConfig(lr=lr, weight_decay=0.0, grad_clip=1.0)


def peer_step(model: nn.Module, loss_fn: LossFn, lr: float, device: torch.device, precision: str, compile: bool,
              backend: str = "inductor") -> StepFn:
    """A peer's model (peft, litgpt) in `fit`'s `TrainStep` with the same optimizer as legolm's rows."""
    optim = optim_config(lr)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], optim, device)
    schedule = LRSchedule(lr, ScheduleConfig(warmup_steps=0, decay="constant"), total_steps=1)
    train = train_step(model, loss_fn, opt, schedule, optim.grad_clip, autocast_for(device, precision), device,
                       compile, backend)

    def step(batch: Batch, i: int) -> torch.Tensor:
        return train([batch], i)[0]

    return step


def peft_step(model: Any, lr: float, device: torch.device, precision: str, compile: bool = False,
              backend: str = "inductor") -> StepFn:
    """peft's model trained by `TrainStep`: fp32-logit CE, backward, clip, AdamW (fused on CUDA)."""
    return peer_step(model, hf_logits_loss, lr, device, precision, compile, backend)


def restorer(model: M) -> Callable[[], M]:
    """A function that puts the trainable weights back to their values now and returns the model."""
    start = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    def restore() -> M:
        with torch.no_grad():
            for p, p0 in zip([p for p in model.parameters() if p.requires_grad], start, strict=True):
                p.copy_(p0)
        return model

    return restore


def legolm_step(model: TransformerLM, lr: float, device: torch.device, precision: str, compile: bool,
                loss_chunk: int = 0, backend: str = "inductor", kernel: LossKernel = "torch") -> StepFn:
    """`fit`'s own step: `TrainStep` with its optimizer (fused AdamW on CUDA over the trainable params)."""
    return peer_step(model, NextTokenLoss(loss_chunk, kernel), lr, device, precision, compile, backend)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step: StepFn, data: list[Batch], warmup: int, device: torch.device,
            profile: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """Run ``warmup`` untimed steps, then time the rest; peak memory over the whole run. ``profile`` (steps, rows):
    then that many more steps under the profiler (`profile_steps`)."""
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
    result = {"tok/s": tokens / seconds, "peak GB": peak, "loss first": losses[0], "loss last": losses[-1]}
    n, rows = profile
    if n:
        timed_data = data[warmup:]
        result["profile"] = profile_steps(lambda i: step(timed_data[i % len(timed_data)], len(data) + i),
                                          list(range(n)), device, 1000 * seconds / len(timed_data), rows)
        print(f"    profile, ms a step: {profile_line(result['profile'])}", flush=True)
    return result


def build_peft(base: Any, cfg: LoRAConfig, dtype: torch.dtype, device: torch.device) -> Any:
    import peft

    model = base.to(device, dtype)
    pcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,  # type: ignore[arg-type]
                           target_modules=cfg.target_modules)
    return peft.get_peft_model(model, pcfg).train()


def build_ours(state: dict[str, torch.Tensor], config: ModelConfig, cfg: LoRAConfig, peft_model: Any,
               dtype: torch.dtype, device: torch.device) -> TransformerLM:
    """legolm from the same base weights, LoRA injected, A copied from peft (B is zero in both)."""
    family = family_for(model_type(config))
    ours = TransformerLM.from_state_dict(config, convert_state(state, family, config, to_hf=False)).to(device, dtype)
    inject_lora(ours, cfg)
    theirs = dict(peft_model.named_modules())
    hf_names = hf_family(config)
    with torch.no_grad():
        for name, layer in adapter_layers(ours).items():
            hf = hf_module_names(name, hf_names)[0]
            layer.lora_A.copy_(theirs[f"base_model.model.{hf}"].lora_A["default"].weight)  # type: ignore[operator]
    return ours.train()


def build_litgpt(state: dict[str, torch.Tensor], config: ModelConfig, cfg: LoRAConfig, peft_model: Any,
                 dtype: torch.dtype) -> nn.Module | str:
    """`litgpt.lora.GPT` from the same base weights (litgpt's converter), its adapters copied from peft's, base in
    ``dtype`` and adapters fp32, on the CPU; or why there is none ("not installed", "not supported: ...")."""
    why = missing(LITGPT) or litgpt_unsupported(config)
    if why:
        return f"litgpt {why}"
    try:
        model = litgpt_model({k: v.clone() for k, v in state.items()}, config, cfg)
        copy_peft_lora(model, peft_model)
    except ValueError as err:  # a target litgpt cannot adapt
        return f"litgpt: {err}"
    except Exception as err:
        return f"litgpt {failure(err)}"
    return adapters_to_fp32(model.to(dtype)).train()


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(name: str, make: Callable[[], StepFn], data: list[Batch], warmup: int, device: torch.device,
        peer: bool = False, profile: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """One row; a peer's row that breaks reads "failed: ..." (legolm's rows raise)."""
    print(f"  timing {name} ...", flush=True)
    try:
        return {"impl": name, **measure(make(), data, warmup, device, profile)}
    except torch.cuda.OutOfMemoryError:
        return {"impl": name, "tok/s": float("nan"), "peak GB": float("nan"), "note": "out of memory"}
    except Exception as err:
        if not peer:
            raise
        return {"impl": name, "note": failure(err)}
    finally:
        free(device)


def free(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled graphs hold the weights they were traced with
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2", help="GPT-2 or Pythia preset (gpt2, gpt2-medium, pythia-160m)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", nargs="+", default=None,
                        help="peft's module names (default c_attn c_proj on GPT-2, query_key_value dense on Pythia)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time every library with its loss call under torch.compile")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                        "aot_eager with --smoke)")
    parser.add_argument("--peers", nargs="*", default=PEERS, choices=PEERS,
                        help="peer rows beside peft eager (litgpt eager/compile, peft compile)")
    parser.add_argument("--loss-chunk", type=int, default=4096,
                        help="also time legolm with the loss scored this many tokens at a time (0 = not)")
    parser.add_argument("--loss-kernel", choices=["torch", "triton"], default="torch",
                        help="the chunked loss's softmax step (triton: `legolm.kernels.cross_entropy`, GPU)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="profile this many more steps of each row: device time by kind of kernel (0 = not)")
    parser.add_argument("--profile-rows", type=int, default=15, help="costliest kernels listed per profile")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, fp32, 2 steps: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.model = SMOKE_MODELS.get(args.model, args.model)
        args.batch, args.seq, args.steps, args.warmup = 2, 32, 2, 1
        args.loss_chunk = min(args.loss_chunk, 16)
        args.compile_backend = args.compile_backend or "aot_eager"
    backend = args.compile_backend = args.compile_backend or "inductor"
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype, precision = (torch.float32, "fp32") if device.type == "cpu" else (torch.bfloat16, "bf16-mixed")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config = bench_config(args.model)
    kind = model_type(config)
    args.targets = args.targets or DEFAULT_TARGETS[kind]
    cfg = LoRAConfig(r=args.r, alpha=args.alpha, target_modules=args.targets)
    base = hf_random_model(config)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    data = batches(base.config.vocab_size, args.warmup + args.steps, args.batch, args.seq, text_tokens(kind))

    theirs = build_peft(base, cfg, dtype, device)
    n_peft = theirs.get_nb_trainable_parameters()[0]
    cpu = torch.device("cpu")  # every other model waits on the CPU until its rows run (peak GB per row)
    ours = build_ours(state, config, cfg, theirs, dtype, cpu)
    n_trainable = trainable(ours)
    assert n_trainable == n_peft, "legolm and peft adapt different modules"
    lit = build_litgpt(state, config, cfg, theirs, dtype) if "litgpt" in args.peers else None
    fresh_peft = restorer(theirs)  # every run starts from the same adapter weights
    fresh_ours = restorer(ours)
    modes = [False, True] if args.compile else [False]

    def label(library: str, compile: bool) -> str:
        return f"{library} {'compile' if compile else 'eager'}"

    profiled_run = functools.partial(run, profile=(args.profile, args.profile_rows))
    rows = [{**profiled_run("peft (eager)", lambda: peft_step(fresh_peft(), args.lr, device, precision), data,
                            args.warmup, device), "trainable": n_peft}]
    if "peft-compile" in args.peers and args.compile:
        rows.append({**profiled_run("peft compile", lambda: peft_step(fresh_peft(), args.lr, device, precision, True,
                                                                      backend),
                                    data, args.warmup, device, peer=True), "trainable": n_peft})
    theirs = base = fresh_peft = None  # free peft's model before the next runs (peak memory is per run)
    free(device)
    if isinstance(lit, str):
        rows += [{"impl": label("litgpt", c), "note": lit} for c in modes]
    elif lit is not None:
        fresh_lit = restorer(lit.to(device))
        for c in modes:
            rows.append({**profiled_run(label("litgpt", c), lambda c=c: peer_step(  # type: ignore[misc]
                fresh_lit(), logits_loss, args.lr, device, precision, c, backend), data, args.warmup, device, True),
                "trainable": trainable(lit)})
        lit = fresh_lit = None
        free(device)
    fresh_ours = restorer(ours.to(device))
    for c in modes:
        rows.append({**profiled_run(label("legolm", c), lambda c=c: legolm_step(  # type: ignore[misc]
            fresh_ours(), args.lr, device, precision, c, backend=backend), data, args.warmup, device),
            "trainable": n_trainable})
    if args.loss_chunk:
        chunked = f"{label('legolm', args.compile)} + chunked CE ({args.loss_chunk}, {args.loss_kernel})"
        rows.append({**profiled_run(chunked, lambda: legolm_step(fresh_ours(), args.lr, device, precision, args.compile,
                                                        args.loss_chunk, backend, args.loss_kernel), data,
                           args.warmup, device),
                     "trainable": n_trainable})
    reference = rows[0]["tok/s"]
    for row in rows:
        if "tok/s" in row and "note" not in row:
            row["vs peft"] = f"{row['tok/s'] / reference:.2f}x"
        for key in ("tok/s", "peak GB", "loss first", "loss last"):
            if key in row:
                row[key] = f"{row[key]:,.0f}" if key == "tok/s" else f"{row[key]:.2f}" if key == "peak GB" \
                    else f"{row[key]:.4f}"
        if "trainable" in row:
            row["trainable"] = f"{row['trainable']:,}"
    print(f"\nLoRA r={args.r} on {' '.join(args.targets)} ({n_trainable:,} trainable in peft and legolm), "
          f"{args.model}, batch {args.batch} x {args.seq}, {precision}, {args.steps} timed steps after {args.warmup}, "
          f"{device_info()['device']}")
    table = print_table(rows, ["impl", "tok/s", "vs peft", "peak GB", "trainable", "loss first", "loss last",
                               "note"])
    if not args.smoke:
        name = "lora" if args.model == "gpt2" else f"lora-{args.model}"
        path = write_result(name, {**device_info(), "args": vars(args), "rows": rows, "table": table})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

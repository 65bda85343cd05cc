"""Skip2-LoRA vs LoRA: time per epoch (first and later), peak memory and validation loss.

``gpu`` (default): on an HF-shaped GPT-2 (random weights of the real 124M shape, shared by all
runs; ``--model pythia-160m`` for Pythia), the same real-text batches form each epoch; peft LoRA,
legolm LoRA and legolm Skip2-LoRA without and with the Skip-Cache train the same number of
parameters: LoRA r=8 on c_attn + c_proj is 811,008, Skip2-LoRA on all 12 blocks with r=44 is
12·2·768·44 = 811,008 (on Pythia LoRA r=8 on query_key_value + dense, 442,368, and Skip2-LoRA
r=24). Epoch 1 of the cached run fills the cache; later epochs skip the backbone. Every row trains
through `fit`'s `TrainStep`, eagerly and (``--modes``) with its loss call compiled: peft's model
("peft LoRA", "(compiled)" for peft under torch.compile), litgpt's `litgpt.lora.GPT` on Pythia
("litgpt LoRA", its weights through litgpt's converter, its adapters started from peft's; its
fused-QKV LoRA has one A per q, k and v, hence more trainable parameters; "not supported" on
GPT-2, "not installed" without litgpt), and legolm's. See benchmarks/lora.py and benchmarks/peers.py.

``compare``: reads the ``summary.json`` of ``legolm finetune`` runs (e.g. ``--method lora`` and
``--method skip2lora`` on the same base and data) and prints their per-epoch table and a PNG. This
is how the real-model comparison (a pretrained base, held-out perplexity) is reported.

    python -m benchmarks.skip2lora                       # GPU
    python -m benchmarks.skip2lora --model pythia-160m   # GPU, Pythia: the litgpt rows too
    python -m benchmarks.skip2lora --smoke               # CPU, tiny GPT-2: checks it runs (compiles with aot_eager)
    python -m benchmarks.skip2lora --smoke --model pythia-160m   # CPU, tiny Pythia: every row
    python -m benchmarks.skip2lora compare runs/ft-lora runs/ft-skip2lora --png runs/skip2lora.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import device_info, hf_random_model, print_table, write_result
from benchmarks.lora import (
    DEFAULT_TARGETS,
    SMOKE_MODELS,
    batches,
    bench_config,
    build_litgpt,
    build_ours,
    build_peft,
    free,
    legolm_step,
    model_type,
    optim_config,
    peer_step,
    peft_step,
    restorer,
    sync,
    text_tokens,
    trainable,
)
from benchmarks.peers import PEERS, failure, logits_loss, train_step
from legolm.adapters import LoRAConfig
from legolm.adapters.inject import unload
from legolm.adapters.skip2lora import HEAD_GRADS, HeadGrad, Skip2LoRAConfig, Skip2LoRAModel
from legolm.adapters.skip2lora_train import Skip2LoRALoss
from legolm.adapters.skip_cache import SkipCache
from legolm.model.transformer import TransformerLM
from legolm.train.batches import Batch
from legolm.train.config import ScheduleConfig
from legolm.train.fit import autocast_for
from legolm.train.head_loss import LossKernel, aligned_rows
from legolm.train.optim import LRSchedule, build_optimizer
from legolm.utils.io import atomic_savefig

StepFn = Callable[[Batch, int], torch.Tensor]


def skip_step(model: Skip2LoRAModel, cache: SkipCache | None, lr: float, device: torch.device,
              precision: str, loss_chunk: int = 0, compile: bool = False, backend: str = "inductor",
              kernel: LossKernel = "torch", compile_mode: str = "default", head_grad: HeadGrad = "auto",
              cuda_graph: bool = False) -> StepFn:
    optim = optim_config(lr)
    opt = build_optimizer(list(model.trainable()), optim, device)
    schedule = LRSchedule(lr, ScheduleConfig(warmup_steps=0, decay="constant"), total_steps=1)
    loss_fn = Skip2LoRALoss(cache, loss_chunk, kernel, head_grad=head_grad)
    train = train_step(model, loss_fn, opt, schedule, optim.grad_clip,
                       autocast_for(device, precision), device, compile, backend, compile_mode, cuda_graph)

    def step(batch: Batch, i: int) -> torch.Tensor:
        return train([batch], i)[0]

    return step


@torch.no_grad()
def val_loss(forward: Callable[[torch.Tensor], torch.Tensor], val: list[Batch], device: torch.device,
             precision: str) -> float:
    total = 0.0
    with autocast_for(device, precision):
        for b in val:
            logits = forward(b["input_ids"].to(device))
            total += float(F.cross_entropy(logits.flatten(0, 1).float(), b["labels"].to(device).flatten()))
    return total / len(val)


def profile_epoch(step: StepFn, data: list[Batch], epoch: int, rows: int) -> str:
    """One more epoch under `torch.profiler` (CPU and CUDA): its ``rows`` most expensive ops by device time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i, b in enumerate(data):
            step(b, epoch * len(data) + i)
        torch.cuda.synchronize()
    return str(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows))


def epochs(step: StepFn, data: list[Batch], n_epochs: int, device: torch.device) -> dict[str, Any]:
    """Seconds of each epoch over ``data`` (the first, the mean of the later ones, the last) and the peak memory
    of the run."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for e in range(n_epochs):
        sync(device)
        t0 = time.perf_counter()
        for i, b in enumerate(data):
            step(b, e * len(data) + i)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    return {"epoch 1 s": times[0], "later epochs s": sum(times[1:]) / max(len(times) - 1, 1), "last epoch s": times[-1],
            "peak GB": peak}


def graphed_row(plain: torch.nn.Module, train: list[Batch], val: list[Batch], args: argparse.Namespace,
                device: torch.device, precision: str, skip_r: int, compiled_body: bool) -> dict[str, Any]:
    """Skip2-LoRA with a Skip-Cache on the training device, each step one CUDA graph once the cache is full
    (`TrainStep(cuda_graph=True)`, what ``--run.cuda-graph`` runs: epoch 1 fills the cache eagerly, epoch 2
    warms up, captures and replays), the loss compiled first with ``compiled_body``. Off the GPU: eager."""
    assert isinstance(plain, TransformerLM)
    n_blocks, cuda = plain.config.n_layer, device.type == "cuda"
    model = Skip2LoRAModel(plain, Skip2LoRAConfig(block_indices=list(range(n_blocks)), r=skip_r,
                                                  alpha=2.0 * skip_r)).to(device)
    shape = (len(train) * args.batch, n_blocks + 1, args.seq, plain.config.n_embd)
    cache = SkipCache(*shape, dtype=torch.bfloat16 if cuda else torch.float32, storage="gpu" if cuda else "cpu",
                      device=device, key="bench")
    data = [{**b, "sample_ids": torch.arange(i * args.batch, (i + 1) * args.batch)} for i, b in enumerate(train)]
    step = skip_step(model, cache, args.lr, device, precision, args.loss_chunk, compiled_body,
                     args.compile_backend or "inductor", args.loss_kernel, head_grad=args.head_grad[0],
                     cuda_graph=cuda)
    where = "gpu" if cuda else "cpu"
    how = " (compiled)" if compiled_body else ""
    return {"impl": f"legolm Skip2-LoRA + Skip-Cache ({where}){chunked(args.loss_chunk, args.loss_kernel)}"
                    f"{how}, one CUDA graph per step, {args.head_grad[0]} head grad",
            "trainable": sum(p.numel() for p in model.trainable()), **epochs(step, data, args.epochs, device),
            "val loss": val_loss(model, val, device, precision)}


@torch.no_grad()
def head_gemm_floors(model: torch.nn.Module, data: list[Batch], device: torch.device, dtype: torch.dtype,
                     repeats: int) -> tuple[float, float]:
    """Seconds per epoch of the frozen head's two GEMMs alone, timed here: logits = X Wᵀ and dX = dlogits W;
    and of the logits GEMM alone.

    A cached Skip2-LoRA epoch whose gradients go through the head input cannot beat them (the adapters feed
    the head, so both run for every token); with the low-rank head (`legolm.train.low_rank_head`) the
    second becomes two products at the adapters' rank, and the logits GEMM (the second floor) is the one
    full-size GEMM left. X is the backbone's output on the first batch and dlogits the true loss gradient there;
    the median of ``repeats`` timings of one batch, times the batches of an epoch. The head's rows are
    padded to a multiple of 64 (zeros) as the chunked loss pads them: cuBLAS is several times slower on
    an odd vocabulary (GPT-2's 50,257) in the GEMM whose K it is.
    """
    weight = model.lm_head.weight.to(device, dtype)  # type: ignore[union-attr]
    head = aligned_rows(weight)  # (V', C)
    b = data[0]
    x = model.to(device)(b["input_ids"].to(device), logits=False).flatten(0, 1).to(dtype)  # (N, C)
    grad = (x @ head.T).float().softmax(-1)  # (N, V)
    grad[torch.arange(x.shape[0], device=device), b["labels"].to(device).flatten()] -= 1.0
    grad[:, weight.shape[0]:] = 0.0
    grad = (grad / x.shape[0]).to(dtype)

    def gemms() -> None:
        x @ head.T
        grad @ head

    return (_epoch_seconds(gemms, device, repeats, len(data)),
            _epoch_seconds(lambda: x @ head.T, device, repeats, len(data)))


def _epoch_seconds(fn: Callable[[], object], device: torch.device, repeats: int, batches: int) -> float:
    """Median of ``repeats`` CUDA-event timings of ``fn`` (one batch), times ``batches``; nan off the GPU."""
    if device.type != "cuda":
        return math.nan
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2] * batches


def chunked(chunk: int, kernel: str = "torch") -> str:
    return f" + chunked CE ({chunk}{', triton' if kernel == 'triton' else ''})" if chunk else ""


def compiled(mode: str) -> str:
    return " (compiled)" if mode == "compile" else ""


def gpu(args: argparse.Namespace) -> None:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype, precision = (torch.float32, "fp32") if device.type == "cpu" else (torch.bfloat16, "bf16-mixed")
    backend = args.compile_backend
    config = bench_config(args.model, args.corpus)
    kind = model_type(config)
    base = hf_random_model(config)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    data = batches(config.vocab_size, args.batches + args.val_batches, args.batch, args.seq,
                   text_tokens(kind, args.corpus))
    train, val = data[: args.batches], data[args.batches:]
    lora = LoRAConfig(r=args.r, alpha=2.0 * args.r, target_modules=DEFAULT_TARGETS[kind])
    theirs = build_peft(base, lora, dtype, device)
    n_lora = theirs.get_nb_trainable_parameters()[0]
    cpu = torch.device("cpu")  # the other models wait on the CPU until their rows run (peak GB per row)
    ours = build_ours(state, config, lora, theirs, dtype, cpu)  # adapters copied before peft trains
    lit = build_litgpt(state, config, lora, theirs, dtype) if "litgpt" in args.peers else None
    rows: list[dict[str, Any]] = []
    fresh_peft = restorer(theirs)
    for mode in args.modes:
        if mode == "compile" and "peft-compile" not in args.peers:
            continue
        impl = f"peft LoRA{compiled(mode)}"
        try:
            step = peft_step(fresh_peft(), args.lr, device, precision, mode == "compile", backend)
            rows.append({"impl": impl, "trainable": n_lora, "mode": mode, **epochs(step, train, args.epochs, device),
                         "val loss": val_loss(lambda x: theirs(input_ids=x).logits, val, device, precision)})
        except Exception as err:  # a peer that breaks is a row saying so
            rows.append({"impl": impl, "mode": mode, "note": failure(err)})
        free(device)
    theirs = base = fresh_peft = None
    free(device)
    if isinstance(lit, str):
        rows += [{"impl": f"litgpt LoRA{compiled(mode)}", "mode": mode, "note": lit} for mode in args.modes]
    elif lit is not None:
        lit_model = lit.to(device)
        fresh_lit = restorer(lit_model)
        for mode in args.modes:
            impl = f"litgpt LoRA{compiled(mode)}"
            try:
                step = peer_step(fresh_lit(), logits_loss, args.lr, device, precision, mode == "compile", backend)
                rows.append({"impl": impl, "trainable": trainable(lit_model), "mode": mode,
                             **epochs(step, train, args.epochs, device),
                             "val loss": val_loss(lit_model, val, device, precision)})
            except Exception as err:  # a peer that breaks is a row saying so
                rows.append({"impl": impl, "mode": mode, "note": f"litgpt {failure(err)}"})
            free(device)
        lit = lit_model = fresh_lit = None
        free(device)
    ours = ours.to(device)

    chunks = [0, args.loss_chunk] if args.loss_chunk else [0]
    fresh = restorer(ours)  # every LoRA run starts from the same adapters
    lora_rows: dict[str, dict[str, Any]] = {}  # mode -> the plain legolm LoRA row: each mode's reference
    for mode, chunk in [(m, k) for m in args.modes for k in chunks]:
        free(device)
        step = legolm_step(fresh(), args.lr, device, precision, mode == "compile", chunk, backend, args.loss_kernel)
        impl = f"legolm LoRA{chunked(chunk, args.loss_kernel)}{compiled(mode)}"
        rows.append({"impl": impl, "trainable": n_lora, "mode": mode,
                     **epochs(step, train, args.epochs, device), "val loss": val_loss(ours, val, device, precision)})
        lora_rows.setdefault(mode, rows[-1])
    plain = unload(ours)
    floor, floor1 = head_gemm_floors(plain, train, device, dtype, args.floor_repeats)
    n_blocks = plain.config.n_layer
    skip_r = args.skip_r or max(1, round(n_lora / (n_blocks * 2 * plain.config.n_embd)))
    storages = args.storages if device.type == "cuda" else ["cpu"]  # where the Skip-Cache lives
    profiles: dict[str, str] = {}
    runs = [(st, m, k, g) for st in (None, *storages) for m in args.modes for k in chunks
            for g in (args.head_grad if st is not None else args.head_grad[:1])]  # both ways on cached rows
    for storage, mode, chunk, head_grad in runs:
        cached = storage is not None
        free(device)
        model = Skip2LoRAModel(plain, Skip2LoRAConfig(block_indices=list(range(n_blocks)), r=skip_r,
                                                      alpha=2.0 * skip_r)).to(device)
        cache = None
        if cached:
            shape = (len(train) * args.batch, n_blocks + 1, args.seq, plain.config.n_embd)
            cache = SkipCache(*shape, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                              storage=storage, device=device, key="bench")
        data_ids = [{**b, "sample_ids": torch.arange(i * args.batch, (i + 1) * args.batch)}
                    for i, b in enumerate(train)]
        step = skip_step(model, cache, args.lr, device, precision, chunk, mode == "compile", backend, args.loss_kernel,
                         args.skip_compile_mode, head_grad)
        where = f" + Skip-Cache ({storage})" if cached else ""
        how = compiled(mode) if mode != "compile" or args.skip_compile_mode == "default" else \
            f" (compiled, {args.skip_compile_mode})"
        impl = f"legolm Skip2-LoRA{where}{chunked(chunk, args.loss_kernel)}{how}, {head_grad} head grad"
        rows.append({"impl": impl, "mode": mode,
                     "trainable": sum(p.numel() for p in model.trainable()),
                     **epochs(step, data_ids, args.epochs, device),
                     "val loss": val_loss(model, val, device, precision)})
        if args.profile and storage == "gpu" and device.type == "cuda":
            profiles[impl] = profile_epoch(step, data_ids, args.epochs, args.profile)
            print(f"profile of one more epoch, {impl}:\n{profiles[impl]}")
        plain = model.base  # the backbone, untouched, for the next run
    del step, cache, model  # the last cached row's Skip-Cache would count in the graphed rows' peak memory
    for mode in args.modes if args.graph_step else []:  # eager: the eager body captured; compile: the compiled one
        free(device)
        rows.append({**graphed_row(plain, train, val, args, device, precision, skip_r, mode == "compile"),
                     "mode": mode})
    refs = {mode: float(row["later epochs s"]) for mode, row in lora_rows.items()}
    eager_ref = refs[args.modes[0]]
    for row in rows:
        if "note" in row:  # a peer that did not run
            continue
        same = refs.get(row.get("mode", ""), eager_ref)
        row[f"later vs legolm LoRA {args.modes[0]}"] = f"{eager_ref / row['later epochs s']:.1f}x"
        row["later vs legolm LoRA same mode"] = f"{same / row['later epochs s']:.1f}x"
        row["later vs head GEMM floor"] = f"{row['later epochs s'] / floor:.2f}x" if floor == floor else ""
        row["later vs logits GEMM"] = f"{row['later epochs s'] / floor1:.2f}x" if floor1 == floor1 else ""
        for key in ("epoch 1 s", "later epochs s", "last epoch s", "val loss"):
            row[key] = f"{row[key]:.3f}"
        row["peak GB"] = f"{row['peak GB']:.2f}"
        row["trainable"] = f"{row['trainable']:,}"
    print(f"\n{args.model} (vocab {config.vocab_size:,}), batch {args.batch} x {args.seq}, {args.batches} batches "
          f"per epoch, {args.epochs} epochs, {precision}, {device_info()['device']}; the head's two GEMMs alone: "
          f"{floor:.3f} s per epoch, its logits GEMM alone {floor1:.3f} s (measured)")
    cols = ["impl", "trainable", "epoch 1 s", "later epochs s", "last epoch s",
            f"later vs legolm LoRA {args.modes[0]}",
            "later vs legolm LoRA same mode", "later vs head GEMM floor", "later vs logits GEMM", "peak GB",
            "val loss", "note"]
    table = print_table(rows, cols)
    if not args.smoke:
        name = "skip2lora" + ("" if args.model == "gpt2" else f"-{args.model}") \
            + ("" if args.corpus is None else f"-vocab{config.vocab_size}") \
            + ("" if args.modes == ["eager", "compile"] else "-" + "-".join(args.modes))  # a subset: its own file
        result = {**device_info(), "args": vars(args), "head_gemm_floor_s": floor, "logits_gemm_floor_s": floor1,
                  "rows": rows, "table": table,
                  "profiles": profiles}
        print(f"wrote {write_result(name, result)}")


def compare(args: argparse.Namespace) -> None:
    runs = []
    for d in args.runs:
        s = json.loads((Path(d) / "summary.json").read_text())
        runs.append((s["method"], s))
    rows = []
    for method, s in runs:
        for e in s["epochs"]:
            rows.append({"method": method, "epoch": e["epoch"], "train s": f"{e['train_seconds']:.1f}",
                         "val ppl": f"{e['val_ppl']:.2f}", "peak MB": f"{e['peak_memory_mb']:,.0f}",
                         "trainable": f"{s['fit']['trainable_params']:,}"})
        rows.append({"method": method, "epoch": "held-out", "val ppl": f"{s['before']['ppl']:.2f} -> "
                     f"{s['after']['ppl']:.2f} (sliding window)"})
    print_table(rows, ["method", "epoch", "trainable", "train s", "val ppl", "peak MB"])
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for method, s in runs:
            ep = [e["epoch"] for e in s["epochs"]]
            a1.plot(ep, [e["train_seconds"] for e in s["epochs"]], marker="o", label=method)
            a2.plot(ep, [e["val_ppl"] for e in s["epochs"]], marker="o", label=method)
        a1.set(xlabel="epoch", ylabel="training seconds", title="time per epoch")
        a2.set(xlabel="epoch", ylabel="validation perplexity", title="quality")
        a1.legend()
        fig.tight_layout()
        atomic_savefig(fig, Path(args.png), dpi=120)
        print(f"wrote {args.png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode")
    cmp_ = sub.add_parser("compare", help="table + PNG of legolm finetune runs")
    cmp_.add_argument("runs", nargs="+")
    cmp_.add_argument("--png")
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=16, help="training batches per epoch")
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--r", type=int, default=8, help="LoRA rank (Skip2-LoRA's rank matches its parameter count)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--modes", nargs="+", choices=["eager", "compile"], default=["eager", "compile"],
                        help="run every row eagerly and/or under torch.compile")
    parser.add_argument("--peers", nargs="*", default=PEERS, choices=PEERS,
                        help="peer rows beside eager peft LoRA (litgpt LoRA, peft LoRA compiled)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                        "aot_eager with --smoke)")
    parser.add_argument("--loss-chunk", type=int, default=4096,
                        help="also run legolm with the loss scored this many tokens at a time (0 = not)")
    parser.add_argument("--loss-kernel", choices=["torch", "triton"], default="torch",
                        help="the chunked loss's softmax step (legolm rows with --loss-chunk)")
    parser.add_argument("--corpus", default=None, help="a prepared corpus directory (e.g. "
                        ".bench/lego-gutenberg-bpe4096): its text and its vocabulary for the model "
                        "(a small head on the preset's backbone)")
    parser.add_argument("--skip-r", type=int, default=0,
                        help="Skip2-LoRA's rank (0: LoRA's trainable-parameter count, the default; a smaller rank, "
                             "e.g. 8, is where the low-rank head gradient pays: K r <= n_embd / 4)")
    parser.add_argument("--head-grad", nargs="+", choices=list(HEAD_GRADS), default=["low-rank", "chain"],
                        help="cached Skip2-LoRA rows, one per value: the adapters' gradients through the head at "
                             "their rank (legolm.train.low_rank_head), through the head-input gradient (chain), or "
                             "auto (low-rank where 4 K r <= n_embd); the other rows take the first")
    parser.add_argument("--floor-repeats", type=int, default=10, help="timings of the head-GEMM floor")
    parser.add_argument("--skip-compile-mode", default="default", choices=["default", "reduce-overhead"],
                        help="torch.compile mode of the Skip2-LoRA rows (reduce-overhead: CUDA graphs of the compiled "
                        "step, for steps bound by launches)")
    parser.add_argument("--graph-step", action="store_true",
                        help="add a row per mode whose cached epochs replay one CUDA graph per step, optimizer "
                             "included (TrainStep(cuda_graph=True), what --run.cuda-graph runs)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="profile one more epoch of each GPU Skip-Cache row: its ROWS costliest ops (0 = not)")
    parser.add_argument("--storages", nargs="+", choices=["gpu", "cpu"], default=["gpu", "cpu"],
                        help="where the Skip-Cache rows keep the cache (the GPU machine; CPU runs use cpu)")
    parser.add_argument("--smoke", action="store_true", help="tiny GPT-2 on CPU: checks it runs")
    args = parser.parse_args()
    if args.mode == "compare":
        compare(args)
        return
    if args.smoke:
        args.model = SMOKE_MODELS.get(args.model, args.model)
        args.batch, args.seq, args.batches, args.val_batches, args.epochs = 2, 32, 3, 1, 2
        args.compile_backend = args.compile_backend or "aot_eager"
    args.compile_backend = args.compile_backend or "inductor"
    gpu(args)


if __name__ == "__main__":
    main()

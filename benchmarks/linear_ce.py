"""Linear + cross-entropy (the LM head and its loss), forward + backward: time, memory and gradient error.

One (tokens x hidden) @ (hidden x vocab) head and its mean next-token cross-entropy, default
16,384 x 768 x 50,304 in bf16, timed as ``loss = f(x, W, labels); loss.backward()`` by each
implementation in the same process, on the same tensors:

    plain eager              F.cross_entropy(F.linear(x, W).float(), labels): the logits materialised
    plain compile            the same function under torch.compile
    legolm torch chunk n     legolm.train.head_loss.head_cross_entropy(head, x, labels, n, kernel="torch")
    legolm triton chunk n    the same with kernel="triton" (legolm/kernels/cross_entropy.py), n = --chunks
    legolm triton chunk n vocab m   the same, dW by chunks of m vocabulary entries in a second pass that
                             recomputes their logits (``vocab_chunk``: no fp32 dW accumulator), --vocab-pass n:m
    liger                    Liger Kernel's LigerFusedLinearCrossEntropyLoss, as it comes (accum_dtype=None)
    liger accum fp32         the same with accum_dtype=torch.float32 (W's gradient accumulated in fp32)

A Liger row reads "not installed" when ``liger_kernel`` cannot be imported (it is no dependency of
legolm: the ``bench`` extra, or the carried wheel on the GPU machine, see the README's Benchmarks).

Inputs are real. The hidden states are the final hidden states (after the last norm, what the head
reads) of a legolm model run on real text, Tiny Shakespeare windows of ``--seq`` tokens, and the
labels are each position's next token; the head weight is that model's own LM head.

    --model gpt2 (default)   GPT-2 small's shape (12 layers, 768 wide, tied head, vocabulary padded to
                             50,304) with RANDOM weights (legolm's init, seed 0), on GPT-2-tokenized text
                             (``.bench/tinyshakespeare_gpt2.npy``). No trained GPT-2-shaped weights are
                             available here (the shared folder holds only SmolLM2), so the softmax is
                             nearly flat (loss ~ ln V); ``--hidden``/``--vocab``/``--layers`` reshape it.
    --model smollm2          the real pretrained SmolLM2-135M (the shared Q4_1 GGUF, dequantised; head
                             576 x 49,152, tied), on the same text tokenized with its own tokenizer:
                             a trained model's peaked softmax. ``--hidden``/``--vocab`` do not apply.

Per row: ms = median of ``--repeats`` calls after ``--warmup`` (CUDA events around each call; the
grads are set to None before each, so every call allocates dX and dW afresh); extra GB = peak
``torch.cuda.max_memory_allocated()`` during one call minus the memory allocated before it (x, W and
the labels exist already; dX and dW themselves, 0.10 GB at the default shape, are counted; GB = 2^30
bytes); the gradient error of that call against an fp32 reference (the same x, W in fp32, TF32 off,
logits materialised): max |dX - dX_ref| and ||dX - dX_ref|| / ||dX_ref||, the same for dW, and
|loss - loss_ref|.

    python benchmarks/prepare_data.py                         # once, where the shared data is
    python -m benchmarks.linear_ce                            # GPU (carry .bench)
    python -m benchmarks.linear_ce --chunks 8192 4096 1024 --repeats 50
    python -m benchmarks.linear_ce --model smollm2            # needs .bench/models (prepare_data --join)
    python -m benchmarks.linear_ce --smoke --json out.json    # CPU, tiny shapes, Triton's interpreter

``--smoke`` (CPU): 128 tokens x 64 x 1,024 (GPT-2 ids modulo 1,024), a 2-layer model, chunks 64
and 32, bf16, Triton kernels in the interpreter, the compiled row with the ``aot_eager`` backend
(inductor's C++ build alone takes longer than the whole smoke run); no memory figures. It writes
JSON only where ``--json`` says. Triton's interpreter rounds fp32 -> bf16 toward zero where the GPU
rounds to nearest even, so the smoke's Triton rows (legolm triton, Liger) show about twice the bf16
gradient error of the torch rows (the GPU run shows whether any difference remains).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if "--smoke" in sys.argv:  # Triton's CPU interpreter: set before anything imports Triton (torch may)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import BENCH_DATA, device_info, print_table, write_result
from legolm.train.head_loss import LOSS_KERNELS, head_cross_entropy

COLUMNS = ["impl", "ms", "extra GB", "loss err", "dX max abs", "dX rel", "dW max abs", "dW rel"]
LIGER_ROWS = {"liger": None, "liger accum fp32": torch.float32}  # row -> LigerFusedLinearCrossEntropyLoss accum_dtype
SHAKESPEARE = "data/tinyshakespeare.txt"


@dataclass
class Inputs:
    """The benchmark's tensors: head inputs x (N, C), the head weight W (V, C), both leaves in the run's dtype,
    labels (N,), and where they came from."""

    x: Tensor
    weight: nn.Parameter
    labels: Tensor
    source: str


def row_names(chunks: list[int], vocab_pass: list[str]) -> list[str]:
    """Every row of the table, in order (``vocab_pass``: "tokens:vocab" chunk pairs of the Triton rows)."""
    legolm = [f"legolm {k} chunk {c}" for k in LOSS_KERNELS for c in chunks]
    lean = [f"legolm triton chunk {t} vocab {v}" for t, v in (pair.split(":") for pair in vocab_pass)]
    return ["plain eager", "plain compile", *legolm, *lean, *LIGER_ROWS]


# --- inputs ------------------------------------------------------------------------------------------------------


def shakespeare_text() -> str:
    from legolm.data.sources import shared_path

    copy = BENCH_DATA / "shared" / SHAKESPEARE  # what prepare_data copies for the GPU machine
    return (copy if copy.is_file() else shared_path(SHAKESPEARE)).read_text()


def gpt2_ids(n: int) -> np.ndarray:
    """At least ``n`` GPT-2 token ids of Tiny Shakespeare: ``.bench``'s array, else the shared text tokenized here."""
    path = BENCH_DATA / "tinyshakespeare_gpt2.npy"
    if path.is_file():
        return np.load(path).astype(np.int64)
    from legolm.data.sources import shared_path
    from legolm.data.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(shared_path("tokenizers/gpt2"))
    text = shakespeare_text()
    return np.array(tok.encode(text[: max(50_000, 8 * n)]), dtype=np.int64)


def windows(ids: np.ndarray, tokens: int, seq: int) -> tuple[Tensor, Tensor]:
    """Consecutive windows of ``seq`` tokens (B, seq) and their next tokens, B = ceil(tokens / seq)."""
    seq = min(seq, tokens)
    batch = -(-tokens // seq)
    if len(ids) < batch * seq + 1:
        raise SystemExit(f"{len(ids):,} tokens of text are too few for {batch} windows of {seq}")
    rows = torch.from_numpy(ids[: batch * seq + 1].copy())
    return rows[:-1].view(batch, seq), rows[1:].view(batch, seq)


@torch.no_grad()
def final_hidden(model: nn.Module, idx: Tensor, device: torch.device, per_call: int = 4) -> Tensor:
    """The model's final hidden states (B * T, C) of ``idx`` (B, T), ``per_call`` windows at a time, fp32."""
    model.eval()
    out = []
    for part in idx.split(per_call):
        with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext():
            h = model(part.to(device), logits=False)  # (b, T, C): after the final norm
        out.append(h.float().flatten(0, 1))
    return torch.cat(out)


def build_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Inputs:
    from legolm.core.config import ModelConfig
    from legolm.model.transformer import TransformerLM

    if args.model == "smollm2":
        from benchmarks.prepare_data import MODEL_TARGET, SMOLLM2
        from legolm.checkpoints.loader import load
        from legolm.data.sources import shared_path

        path = MODEL_TARGET if MODEL_TARGET.is_file() else shared_path(SMOLLM2)
        model, tokenizer = load(path, device=device)
        ids = np.array(tokenizer.encode(shakespeare_text()), dtype=np.int64)
        source = f"SmolLM2-135M-Instruct (pretrained, {path.name}), Tiny Shakespeare in its own tokenizer"
    else:
        hidden, vocab = args.hidden or 768, args.vocab or 50304
        heads = hidden // 64 if hidden % 64 == 0 else 1
        config = ModelConfig.from_name("gpt2", n_embd=hidden, n_head=heads, intermediate_size=4 * hidden,
                                       vocab_size=vocab, layers=["gpt2"] * args.layers)
        torch.manual_seed(0)
        model = TransformerLM(config).to(device)
        ids = gpt2_ids(args.tokens + 1)
        wrapped = " modulo the vocabulary" if vocab < 50257 else ""
        source = (f"GPT-2-shaped legolm model, {args.layers} layers, RANDOM weights (seed 0), "
                  f"Tiny Shakespeare GPT-2 tokens{wrapped}")
        ids = ids % vocab
    idx, nxt = windows(ids, args.tokens, args.seq)
    x = final_hidden(model, idx, device)[: args.tokens]
    labels = nxt.flatten()[: args.tokens].to(device)
    weight = model.lm_head.weight.detach()
    inputs = Inputs(x.to(dtype).contiguous().requires_grad_(True), nn.Parameter(weight.to(dtype).clone()), labels,
                    source)
    del model, x, weight
    free(device)
    return inputs


# --- the implementations ----------------------------------------------------------------------------------------

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x, W, labels) -> mean loss


def plain(x: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """The whole (N, V) logits in the inputs' dtype, the softmax in fp32."""
    return F.cross_entropy(F.linear(x, weight).float(), labels)


def legolm_loss(chunk: int, kernel: str, weight: nn.Parameter, vocab_chunk: int = 0) -> LossFn:
    """legolm's public chunked head loss on a bias-free `nn.Linear` head that holds ``W`` itself."""
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = weight  # the benchmark's leaf: its .grad is W's gradient

    def fn(x: Tensor, w: Tensor, labels: Tensor) -> Tensor:
        assert w is head.weight
        return head_cross_entropy(head, x, labels, chunk, kernel, vocab_chunk)  # type: ignore[arg-type]

    return fn


def liger_loss(accum_dtype: torch.dtype | None) -> LossFn | str:
    """Liger's fused linear cross-entropy, or why it cannot run ("not installed")."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return "not installed"
    loss = LigerFusedLinearCrossEntropyLoss(accum_dtype=accum_dtype)

    def fn(x: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
        return loss(weight, x, labels)

    return fn


def implementation(name: str, backend: str, weight: nn.Parameter) -> LossFn | str:
    if name == "plain eager":
        return plain
    if name == "plain compile":
        return torch.compile(plain, backend=backend)
    if name.startswith("legolm "):
        _, kernel, _, chunk, *vocab = name.split()
        return legolm_loss(int(chunk), kernel, weight, int(vocab[1]) if vocab else 0)
    return liger_loss(LIGER_ROWS[name])


# --- measurement ------------------------------------------------------------------------------------------------


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reference(inputs: Inputs) -> tuple[float, Tensor, Tensor]:
    """fp32 loss, dX and dW of the same inputs, logits materialised, TF32 off."""
    x = inputs.x.detach().float().requires_grad_(True)
    w = inputs.weight.detach().float().requires_grad_(True)
    loss = plain(x, w, inputs.labels)
    loss.backward()
    assert x.grad is not None and w.grad is not None
    return loss.item(), x.grad, w.grad


def errors(got: Tensor, want: Tensor) -> tuple[float, float]:
    """max |got - want| and ||got - want|| / ||want||, in fp32."""
    diff = got.float() - want
    return float(diff.abs().max()), float(diff.norm() / want.norm())


def measure(fn: LossFn, inputs: Inputs, ref: tuple[float, Tensor, Tensor], warmup: int, repeats: int,
            device: torch.device) -> dict[str, Any]:
    """Warm up, one call for the peak memory and the errors, then ``repeats`` timed calls."""
    x, w, labels = inputs.x, inputs.weight, inputs.labels

    def step() -> Tensor:
        x.grad = w.grad = None
        loss = fn(x, w, labels)
        loss.backward()
        return loss.detach()

    for _ in range(warmup):
        step()
    x.grad = w.grad = None
    free(device)
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss = step()
    extra = (torch.cuda.max_memory_allocated() - before) / 2**30 if device.type == "cuda" else None
    assert x.grad is not None and w.grad is not None, "an implementation left a gradient unset"
    dx_abs, dx_rel = errors(x.grad, ref[1])
    dw_abs, dw_rel = errors(w.grad, ref[2])
    result = {"loss": float(loss), "loss_err": abs(float(loss) - ref[0]), "dx_max_abs": dx_abs, "dx_rel": dx_rel,
              "dw_max_abs": dw_abs, "dw_rel": dw_rel, "extra_gb": extra}
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        torch.cuda.synchronize()
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - t0))
    x.grad = w.grad = None
    return {**result, "ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times)}


def table_row(name: str, r: dict[str, Any]) -> dict[str, str]:
    if "status" in r:
        return {"impl": name, "ms": r["status"]}
    extra = "n/a" if r["extra_gb"] is None else f"{r['extra_gb']:.3f}"
    return {"impl": name, "ms": f"{r['ms']:.2f}", "extra GB": extra, "loss err": f"{r['loss_err']:.1e}",
            "dX max abs": f"{r['dx_max_abs']:.1e}", "dX rel": f"{r['dx_rel']:.1e}",
            "dW max abs": f"{r['dw_max_abs']:.1e}", "dW rel": f"{r['dw_rel']:.1e}"}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("triton", "liger-kernel"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def add_input_arguments(parser: argparse.ArgumentParser, vocab: int | None) -> None:
    """The options `build_inputs` reads (``vocab``: the default vocabulary; None = 50304)."""
    parser.add_argument("--model", choices=["gpt2", "smollm2"], default="gpt2",
                        help="where the hidden states and head come from (see benchmarks.linear_ce)")
    parser.add_argument("--tokens", type=int, default=16384, help="rows of x (head inputs)")
    parser.add_argument("--hidden", type=int, default=None, help="gpt2 only: model width (default 768)")
    parser.add_argument("--vocab", type=int, default=vocab, help="gpt2 only: vocabulary (default 50304)")
    parser.add_argument("--layers", type=int, default=12, help="gpt2 only: blocks of the model")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per text window the model reads")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="dtype of x and W")


def add_run_arguments(parser: argparse.ArgumentParser, name: str, warmup: int, repeats: int) -> None:
    """Timing, compilation, output and smoke options of a benchmark that writes ``<name>-<date>.json``."""
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls first (compilation happens here)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed calls (the median is reported)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"write the JSON here (default benchmarks/results/{name}-<date>.json; smoke: none)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks it runs (see above)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_arguments(parser, None)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4096, 1024], help="legolm rows' chunk_tokens")
    parser.add_argument("--vocab-pass", nargs="*", default=["1024:1024", "1024:512", "768:512", "512:512"],
                        metavar="TOKENS:VOCAB",
                        help="Triton rows with dW by vocabulary chunks (`vocab_chunk`): token chunk:vocab chunk")
    add_run_arguments(parser, "linear_ce", warmup=3, repeats=20)
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.hidden, args.vocab, args.layers, args.seq = 128, 64, 1024, 2, 64
        args.chunks, args.warmup, args.repeats, args.model = [64, 32], 1, 2, "gpt2"
        args.vocab_pass = ["32:256"]
        args.compile_backend = args.compile_backend or "aot_eager"
    args.compile_backend = args.compile_backend or "inductor"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is fp32 (the rows' dtypes are unaffected)
    torch.backends.cudnn.allow_tf32 = False

    inputs = build_inputs(args, device, dtype)
    n, c = inputs.x.shape
    v = inputs.weight.shape[0]
    ref = reference(inputs)
    free(device)
    header = (f"Linear + cross-entropy fwd+bwd, {n:,} tokens x {c} x {v:,} vocab, {args.dtype}, "
              f"{device_info()['device'] or device.type}; median of {args.repeats} after {args.warmup} warmup; "
              f"fp32 reference loss {ref[0]:.4f}; inputs: {inputs.source}")
    print(header, flush=True)
    results: dict[str, dict[str, Any]] = {}
    for name in row_names(args.chunks, args.vocab_pass):
        fn = implementation(name, args.compile_backend, inputs.weight)
        if isinstance(fn, str):
            results[name] = {"status": fn}
        else:
            print(f"timing {name} ...", flush=True)
            try:
                results[name] = measure(fn, inputs, ref, args.warmup, args.repeats, device)
            except Exception as err:  # a peer (or a chunk size) that fails is one row, not the end of the run
                if name.startswith("legolm ") and args.smoke:
                    raise
                results[name] = {"status": f"failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"}
            torch._dynamo.reset()  # drop compiled graphs before the next row
            free(device)
        r = results[name]
        print(f"{name}: " + (r["status"] if "status" in r else
                             f"{r['ms']:.2f} ms, extra {r['extra_gb']} GB, dX rel {r['dx_rel']:.1e}, "
                             f"dW rel {r['dw_rel']:.1e}"), flush=True)
        save(args, header, results, inputs, ref, complete=False)
    print()
    save(args, header, results, inputs, ref, complete=True)


def save(args: argparse.Namespace, header: str, results: dict[str, dict[str, Any]], inputs: Inputs,
         ref: tuple[float, Tensor, Tensor], complete: bool) -> None:
    """Print the table (when complete) and write the JSON: partial ones mark a run cut short."""
    rows = [{"impl": name, **r} for name, r in results.items()]
    table = ""
    if complete:
        print(header)
        table = print_table([table_row(name, r) for name, r in results.items()], COLUMNS)
    payload = {**device_info(), **versions(), "args": {k: str(v) if isinstance(v, Path) else v
                                                      for k, v in vars(args).items()},
               "shape": {"tokens": inputs.x.shape[0], "hidden": inputs.x.shape[1], "vocab": inputs.weight.shape[0]},
               "inputs": inputs.source, "reference_loss": ref[0], "complete": complete, "rows": rows,
               "header": header, "table": table}
    if args.json is not None:
        import json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        path: Path | None = args.json
    elif not args.smoke:
        path = write_result("linear_ce", payload)
    else:
        path = None
    if complete and path is not None:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()

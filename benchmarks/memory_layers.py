"""Long-context streaming: tokens/s and peak memory of pythia and the memory-layer models as the
context grows (2,048 / 8,192 / 32,768 tokens), legolm and Hugging Face in the same process.

Each model reads one document of N real tokens (Tiny Shakespeare, GPT-2 ids from ``.bench/``) in
chunks of ``--chunk`` tokens and produces the logits of every token, as when scoring a long text::

    legolm pythia          static KV cache of N slots; each chunk attends to every earlier token:
                           the state grows with N (6 layers x 2 x N x 512 values)
    HF GPT-NeoX (peer)     the same weights through transformers with its DynamicCache, same chunks
    legolm infini,         memory carried across chunks (carry_memory), one chunk = one segment;
    multi_memory,          their Pythia layers attend within the chunk: the state is the memory
    hierarchical           layer's fixed-size M and z, whatever N is

Peak memory is `torch.cuda.max_memory_allocated` over one whole stream (weights included);
"state MB" is the KV cache or the memory state at the end of the stream.

    python benchmarks/prepare_data.py                       # once, where the shared data is
    python -m benchmarks.memory_layers                      # GPU: bf16, 2k / 8k / 32k
    python -m benchmarks.memory_layers --smoke              # CPU: tiny sizes, crash check only
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS, device_info, print_table, real_tokens, write_result
from legolm.checkpoints.hf import convert_state, export_hf_state, family_for
from legolm.core.kv_cache import KVCache
from legolm.layers.memory_state import carry_memory, memory_state_nbytes, reset_memory
from legolm.model.factory import create_model
from legolm.model.transformer import TransformerLM

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
MB = 2**20


@dataclass
class BenchConfig:
    """What to measure.

    Attributes:
        models: legolm model kinds (pythia also runs through Hugging Face as the peer).
        contexts: Document lengths N in tokens.
        chunk: Tokens per call (and segment_len of the memory layers).
        base: ModelConfig preset of the sizes (pythia-70m: 6 layers, 512 wide, 8 heads).
        vocab_size: Embedding rows (GPT-2's 50,257 ids rounded up to 64).
        dtype: Weights and activations.
        repeats: Timed streams per point (median reported), after one warm-up stream.
        hf: Also run the Hugging Face GPT-NeoX peer.
        device: Where to run.
    """

    models: list[str] = field(default_factory=lambda: ["pythia", "infini", "multi_memory", "hierarchical"])
    contexts: list[int] = field(default_factory=lambda: [2048, 8192, 32768])
    chunk: int = 2048
    base: str = "pythia-70m"
    vocab_size: int = 50304
    dtype: str = "bfloat16"
    repeats: int = 3
    hf: bool = True
    device: str = "cuda"


SMOKE = BenchConfig(contexts=[128, 256, 512], chunk=64, base="tiny-pythia", dtype="float32", repeats=1,
                    device="cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(stream: Callable[[], int], device: torch.device, repeats: int) -> tuple[float, float | None, int]:
    """(median seconds of a stream, peak MB or None off CUDA, state bytes it reports)."""
    state_bytes = stream()  # warm-up (kernels, allocator)
    times = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        state_bytes = stream()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else None
    return statistics.median(times), peak, state_bytes


def legolm_stream(model: TransformerLM, ids: torch.Tensor, chunk: int) -> Callable[[], int]:
    """Chunks through a static KV cache (pythia) or with carried memory (memory layers)."""
    n = ids.shape[1]
    memory = any(k != "pythia" for k in model.config.layers)

    @torch.inference_mode()
    def run() -> int:
        if memory:
            reset_memory(model)
            with carry_memory(model):
                for s in range(0, n, chunk):
                    model(ids[:, s:s + chunk])
            return memory_state_nbytes(model)
        p = next(model.parameters())
        cache = KVCache(model.config, 1, n, dtype=p.dtype, device=p.device)
        for s in range(0, n, chunk):
            model(ids[:, s:s + chunk], cache=cache, input_pos=torch.arange(s, min(s + chunk, n), device=p.device))
        return cache.nbytes()

    return run


def hf_peer(model: TransformerLM) -> Any:
    """transformers' GPT-NeoX of the pythia model's shape; the legolm model takes its weights, so both are equal."""
    import transformers

    hf_cfg, _ = export_hf_state(model.config, model.state_dict())
    family = family_for(hf_cfg["model_type"])
    config = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    torch.manual_seed(0)
    hf = getattr(transformers, family.architecture)(config)
    state = convert_state(dict(hf.state_dict()), family, model.config, to_hf=False)
    p = next(model.parameters())
    model.load_state_dict({k: v.to(p.device, p.dtype) for k, v in state.items()})
    return hf.to(p.device, p.dtype).eval()


def hf_stream(hf: Any, ids: torch.Tensor, chunk: int) -> Callable[[], int]:
    @torch.inference_mode()
    def run() -> int:
        cache = None
        for s in range(0, ids.shape[1], chunk):
            cache = hf(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True).past_key_values
        layers = getattr(cache, "layers", [])
        return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values))

    return run


def build(kind: str, cfg: BenchConfig, device: torch.device) -> TransformerLM:
    torch.manual_seed(0)
    options: dict[str, Any] = {"segment_len": cfg.chunk} if kind != "pythia" else {}
    model = create_model(kind, base=cfg.base, vocab_size=cfg.vocab_size, block_size=max(cfg.contexts), **options)
    return model.to(device, DTYPES[cfg.dtype]).eval()


@torch.inference_mode()
def last_logits_diff(model: TransformerLM, hf: Any, ids: torch.Tensor, chunk: int) -> float:
    """Max |logit difference| between legolm and HF on the last chunk of a cached stream."""
    p = next(model.parameters())
    cache, past, n = KVCache(model.config, 1, ids.shape[1], dtype=p.dtype, device=p.device), None, ids.shape[1]
    for s in range(0, n, chunk):
        ours = model(ids[:, s:s + chunk], cache=cache, input_pos=torch.arange(s, min(s + chunk, n), device=p.device))
        out = hf(input_ids=ids[:, s:s + chunk], past_key_values=past, use_cache=True)
        past = out.past_key_values
    return float((ours.float() - out.logits.float()).abs().max())


def run(cfg: BenchConfig) -> tuple[list[dict[str, Any]], float | None]:
    """One row per (library, model, context), and the legolm/HF logit difference (None without HF)."""
    device = torch.device(cfg.device)
    text = real_tokens("gpt2").astype(np.int64)
    if len(text) < max(cfg.contexts):
        raise SystemExit(f"the benchmark text has {len(text):,} tokens, fewer than the longest context")
    rows: list[dict[str, Any]] = []
    parity: float | None = None
    for kind in cfg.models:
        model = build(kind, cfg, device)
        runners: list[tuple[str, str, Any, Callable[[Any, torch.Tensor, int], Callable[[], int]]]] = [
            ("legolm", kind, model, legolm_stream)]
        if kind == "pythia" and cfg.hf:
            hf = hf_peer(model)
            runners.append(("transformers", "gpt-neox", hf, hf_stream))
            shortest = torch.from_numpy(text[:min(cfg.contexts)])[None].to(device)
            parity = last_logits_diff(model, hf, shortest, cfg.chunk)
        for library, name, m, make in runners:
            for n in cfg.contexts:
                ids = torch.from_numpy(text[:n])[None].to(device)
                seconds, peak, state = measure(make(m, ids, cfg.chunk), device, cfg.repeats)
                rows.append({"library": library, "model": name, "context": n, "tok/s": round(n / seconds),
                             "peak MB": round(peak) if peak is not None else "n/a",
                             "state MB": round(state / MB, 3), "ms/chunk": round(1e3 * seconds * cfg.chunk / n, 2)})
                print(rows[-1], flush=True)
        del model, runners
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, parity


def plot(rows: list[dict[str, Any]], path: Any) -> str | None:
    """Peak memory and tokens/s against context, one line per (library, model)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: pip install matplotlib"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    series = sorted({(r["library"], r["model"]) for r in rows})
    for lib, model in series:
        pts = [r for r in rows if (r["library"], r["model"]) == (lib, model)]
        x = [r["context"] for r in pts]
        for ax, key in zip(axes, ("peak MB", "state MB", "tok/s"), strict=True):
            if all(isinstance(r[key], (int, float)) for r in pts):
                ax.plot(x, [r[key] for r in pts], marker="o", label=f"{model} ({lib})")
    for ax, title in zip(axes, ("peak memory (MB)", "KV cache / memory state (MB)", "tokens/s"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU setting: checks that it runs, nothing more")
    parser.add_argument("--models", nargs="+")
    parser.add_argument("--contexts", nargs="+", type=int)
    parser.add_argument("--chunk", type=int)
    parser.add_argument("--dtype", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--no-hf", dest="hf", action="store_false", default=None)
    ns = parser.parse_args()
    base = SMOKE if ns.smoke else BenchConfig()
    cfg = BenchConfig(**{**asdict(base), **{k: v for k, v in vars(ns).items() if k != "smoke" and v is not None}})
    rows, parity = run(cfg)
    print()
    table = print_table(rows, ["library", "model", "context", "tok/s", "peak MB", "state MB", "ms/chunk"])
    if parity is not None:
        print(f"legolm pythia vs transformers GPT-NeoX, last chunk of the shortest stream: "
              f"max |logit diff| {parity:.3g}")
    if ns.smoke:  # CPU smoke figures mean nothing: nothing is written to benchmarks/results
        out = Path(tempfile.mkdtemp(prefix="memory_layers-smoke-")) / "memory_layers.png"
        print(plot(rows, out) or f"smoke plot: {out}")
        return
    path = write_result("memory_layers", {"config": asdict(cfg), "rows": rows, "table": table,
                                          "hf_parity_max_abs_logit_diff": parity, **device_info()})
    png = RESULTS / path.with_suffix(".png").name
    note = plot(rows, png)
    if note is None and os.environ.get("OUT"):
        shutil.copy(png, Path(os.environ["OUT"]) / png.name)
    print(note or f"results: {path} and {png}")


if __name__ == "__main__":
    main()

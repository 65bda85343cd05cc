"""Shared helpers of the benchmark scripts: real-text token slices, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from legolm.checkpoints.hf import convert_state, export_hf_state, family_for
from legolm.config import nested, parse_yaml
from legolm.core.config import ModelConfig
from legolm.model.transformer import TransformerLM
from legolm.train.batches import WindowBatches

ROOT = Path(__file__).resolve().parents[1]
BENCH_DATA = ROOT / ".bench"  # git-ignored; carried to the GPU machine
RESULTS = ROOT / "benchmarks" / "results"


def real_tokens(tokenizer_name: str) -> np.ndarray:
    """Token ids of real text prepared by `benchmarks/prepare_data.py`."""
    path = BENCH_DATA / f"tinyshakespeare_{tokenizer_name}.npy"
    if not path.is_file():
        raise SystemExit(f"missing {path}: run `python benchmarks/prepare_data.py` first (needs LEGOLM_DATA)")
    return np.load(path)


def cycled(source: WindowBatches, n: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` batches of ``source`` on ``device``, starting a new epoch whenever one runs out."""
    out: list[dict[str, torch.Tensor]] = []
    epoch = 0
    while len(out) < n:
        source.set_epoch(epoch)
        before = len(out)
        out += [{k: v.to(device) for k, v in b.items()} for b in source][: n - len(out)]
        if len(out) == before:
            raise SystemExit("the batch source yielded nothing: too little text for one batch")
        epoch += 1
    return out


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """Median wall time (s) of ``fn`` after ``warmup`` calls, synchronising CUDA (where there is one) around each."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def device_info() -> dict[str, Any]:
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "date": date.today().isoformat(),
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>-<date>.json`` atomically (and to $OUT when set)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{date.today().isoformat()}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / path.name).write_text(path.read_text())
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns}
    lines = ["| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |",
             "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def hf_random_model(config: ModelConfig) -> Any:
    """transformers' model of ``config``'s shape (GPT-2 / GPT-NeoX / Llama), randomly initialised with seed 0 (fp32,
    CPU, SDPA attention): the weights every library of a benchmark starts from, through its own converter."""
    import transformers

    with torch.device("meta"):
        shapes = TransformerLM(config).state_dict()
    hf_cfg, _ = export_hf_state(config, shapes)
    family = family_for(hf_cfg["model_type"])
    cfg = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return getattr(transformers, family.architecture)(cfg)


def legolm_copy(hf: Any, config: ModelConfig) -> TransformerLM:
    """legolm's model holding ``hf``'s weights, through the library's own converter (same device and dtype)."""
    state = convert_state({k: v.detach().clone() for k, v in hf.state_dict().items()}, family_for(hf.config.model_type),
                          config, to_hf=False)
    return TransformerLM.from_state_dict(config, state)


def overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": 1}, "c": "x"}`` (values parsed as YAML)."""
    pairs = [item.partition("=") for item in items]
    bad = [item for item, (key, sep, _) in zip(items, pairs, strict=True) if not sep or not key]
    if bad:
        raise SystemExit(f"--set wants KEY=VALUE, got {bad[0]!r}")
    return nested((key, parse_yaml(value)) for key, _, value in pairs)


# Where a training step's device time goes, by kernel name (first match wins; lower case). cuBLAS / CUTLASS GEMMs,
# flash / memory-efficient attention, and the names torch.compile's Triton kernels get from the ops they fuse;
# on the CPU (smoke runs) the aten operators.
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "logsumexp", "ce_grad")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "wgmma", "sm90_", "sm80_", "ampere_", "cublas",
                "aten::mm", "aten::addmm", "aten::bmm")),
    ("norm", ("layer_norm", "rms_norm", "_norm_")),
    ("copy / cast", ("memcpy", "memset", "copy", "cat_", "fill")),
)


def kernel_kind(name: str) -> str:
    """The `KERNEL_KINDS` entry a kernel's name belongs to, else "other elementwise"."""
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other elementwise")


def profile_steps(step: Callable[[int], Any], indices: list[int], device: torch.device, wall_ms: float,
                  rows: int) -> dict[str, Any]:
    """Run ``step(i)`` for each index under `torch.profiler`: device time per step by `kernel_kind` (ms), the sum
    of the kernels against ``wall_ms`` (the step's time measured without the profiler: the rest is the device
    waiting for the host, launch gaps included), and the ``rows`` costliest kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        for i in indices:
            step(i)
        if cuda:
            torch.cuda.synchronize()
    # on a GPU the kernels themselves; on the CPU (smoke runs) the operators' own time
    events = [e for e in prof.key_averages() if (e.device_type == DeviceType.CUDA) == cuda]
    own = [(e.key, (e.device_time_total if cuda else e.self_cpu_time_total) / 1000 / len(indices)) for e in events]
    kinds: dict[str, float] = {}
    for name, ms in own:
        kind = kernel_kind(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    total = sum(kinds.values())
    top = sorted(own, key=lambda item: -item[1])[:rows]
    return {"ms_per_step": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "kernels_ms": round(total, 3), "wall_ms": round(wall_ms, 3), "idle_ms": round(wall_ms - total, 3),
            "top": [{"name": name[:120], "ms_per_step": round(ms, 3)} for name, ms in top]}


def profile_line(p: dict[str, Any]) -> str:
    """One line of `profile_steps`' result: each kind's ms per step, then kernels against the wall time."""
    parts = ", ".join(f"{kind} {ms:.2f}" for kind, ms in p["ms_per_step"].items())
    return f"{parts} | kernels {p['kernels_ms']:.2f} of {p['wall_ms']:.2f} ms a step (device idle {p['idle_ms']:.2f})"

"""LEGO decoding against the fastest full-depth decoders of the same model, on real text, one process per model.

Trains a LEGO model through `legolm lego`'s job (`legolm.recipes.lego.run`: phase 1, calibration,
extension or a pretrained split, phase 2, the quality table, and the decode table: fused full depth,
the threshold sweep, kv modes, self-speculative), then times more full-depth decoders of the deep model on the same
prompts: legolm's CUDA-graph decoder (`generate` without ``--fused``) and Hugging Face ``generate`` of
the exported deep model (greedy, and with ``assistant_early_exit``, its self-speculative peer).

    python benchmarks/prepare_data.py                                   # once, where the shared data is
    python -m benchmarks.early_exit --config configs/lego-gpu.yaml --name grown        # GPU
    python -m benchmarks.early_exit --config configs/lego-smollm2-gpu.yaml --name smollm2
    python -m benchmarks.early_exit --smoke                             # CPU: tiny model; checks it runs

Writes ``benchmarks/results/early_exit-<name>-<date>.json`` (and the curve PNG beside it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import BENCH_DATA, RESULTS, ROOT, device_info, overrides, print_table, write_result
from legolm.checkpoints.loader import load_pretrained
from legolm.config import config_from_dict, load_yaml, merge
from legolm.data.tokenized import load_tokenized
from legolm.generation import GenerationConfig, generate
from legolm.generation.fused import FUSED_BLOCKS, FusedBlocks
from legolm.lego.config import STORE_DTYPES, LegoConfig
from legolm.lego.report import Setting, measure_decode, val_windows
from legolm.model.lego import LegoLM
from legolm.recipes import lego

SMOKE = {"window": 64, "model": {"preset": "pythia-14m", "layers": ["pythia"], "n_embd": 64, "n_head": 4,
                                 "block_size": 256, "init": None},
         "phase1": {"max_steps": 4, "batch_size": 4, "eval": {"every": 2, "max_batches": 2}},
         "phase2": {"max_steps": 4, "batch_size": 4, "eval": {"every": 2, "max_batches": 2}},
         "lego": {"num_layers": 3, "calib_batches": 2, "collect_batches": 4, "curve_ratios": [0.3], "split": None,
                  "split_candidates": []},
         "decode": {"prompts": 1, "prompt_len": 8, "max_new_tokens": 8, "score_windows": 1, "score_len": 8,
                    "repeats": 1, "warmup": 0, "dtype": "float32", "draft_tokens": [2]},
         "run": {"device": "cpu", "out_dir": "runs/lego-bench-smoke"}}


def whole_calls(fn: Callable[[torch.Tensor], object], prompts: torch.Tensor, repeats: int, device: torch.device
                ) -> float:
    """Median seconds of decoding every prompt row once (whole calls; a warm-up round first)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for row in prompts:
        fn(row[None].to(device))
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for row in prompts:
            fn(row[None].to(device))
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def references(model: LegoLM, prompts: torch.Tensor, new: int, repeats: int, hf_prompts: int,
               fused_tok_s: float, kernel: FusedBlocks) -> list[dict[str, Any]]:
    """Full-depth decoders of the deep model that `lego.run`'s table does not time (greedy, batch 1): on a GPU
    also the fused blocks other than ``kernel`` (the table's), so either can be the fastest baseline."""
    device = next(model.parameters()).device
    graph = GenerationConfig(max_new_tokens=new, greedy=True, stop_at_eos=False)
    rows = [("legolm generate, CUDA graph" if device.type == "cuda" else "legolm generate, static cache",
             lambda p: generate(model, p.tolist(), graph), prompts, repeats)]
    for other in FUSED_BLOCKS if device.type == "cuda" else ():
        if other == kernel:
            continue
        fused = GenerationConfig(max_new_tokens=new, greedy=True, stop_at_eos=False, fused=True, fused_kernel=other)
        rows.append((f"legolm generate --fused --fused-kernel {other}",
                     lambda p, fused=fused: generate(model, p.tolist(), fused), prompts, repeats))
    hf = hf_model(model)
    if hf is not None:
        few = prompts[:hf_prompts]
        kw = {"do_sample": False, "max_new_tokens": new, "min_new_tokens": new, "pad_token_id": 0}
        rows.append(("HF generate (greedy)", lambda p: hf.generate(p, attention_mask=torch.ones_like(p), **kw), few,
                     1))
        rows.append((f"HF generate, assistant_early_exit={model.split}", lambda p: hf.generate(
            p, attention_mask=torch.ones_like(p), assistant_early_exit=model.split, **kw), few, 1))
    out = []
    for name, fn, ps, reps in rows:
        try:
            seconds = whole_calls(fn, ps, reps, device)
        except Exception as err:  # a peer's option may not exist in the installed transformers
            # e.g. transformers 5.x's early-exit assistant on GPT-NeoX and GPT-2 (IndexError in its cache)
            note = f"failed: {type(err).__name__}: {err}".splitlines()[0]
            out.append({"decoder": name, "tok/s": None, "vs fused": None, "note": note})
            continue
        tok_s = len(ps) * new / seconds
        out.append({"decoder": name, "tok/s": round(tok_s), "vs fused": round(tok_s / fused_tok_s, 3), "note": ""})
    return out


def split_costs(t_short: float, t_long: float, calls: int, short: int, long: int) -> tuple[float, float]:
    """Seconds per token and per call of whole calls: ``calls`` calls of ``short`` new tokens took ``t_short``
    seconds, as many of ``long`` took ``t_long`` (a line through the two: per token is its slope)."""
    per_token = (t_long - t_short) / (calls * (long - short))
    return per_token, t_short / calls - per_token * short


def cost_split(model: LegoLM, prompts: torch.Tensor, new: int, repeats: int, kernel: FusedBlocks,
               draft_tokens: list[int]) -> list[dict[str, Any]]:
    """Per-token and per-call costs of the fastest decoders (whole calls of ``new`` and ``2 * new`` tokens, same
    prompts, same process): the cost of the second ``new`` tokens, against whole calls, which also pay each
    call's fixed costs (prefill, start, the stats read back). The shallow ratio of both lengths says whether
    the later tokens exit more often (then the slope is not the first tokens' cost); the calls of ``new``
    tokens are split into prefill + start, the decode loop and the rest (session lookup, stats, copies)."""
    tau = model.threshold
    settings = [Setting("full depth", "full"), Setting("threshold skip, host read", "threshold", tau, "skip"),
                Setting("threshold skip, IF nodes", "threshold", tau, "skip", if_nodes=True),
                *[Setting(f"speculative d={k}", "speculative", draft_tokens=k) for k in draft_tokens[:1]]]
    short, long = (measure_decode(model, prompts, settings, n, True, kernel, repeats) for n in (new, 2 * new))
    costs = [split_costs(a.wall_s, b.wall_s, len(prompts), new, 2 * new) for a, b in zip(short, long, strict=True)]
    rows = []
    for s, a, b, (per_token, per_call) in zip(settings, short, long, costs, strict=True):
        rest = a.wall_s / len(prompts) - a.prefill_s - a.decode_s
        rows.append({"decoder": s.label, "µs/token": round(per_token * 1e6, 1), "ms/call": round(per_call * 1e3, 2),
                     "per-token speed-up": round(costs[0][0] / per_token, 3),
                     "whole-call tok/s": round(a.tokens / a.wall_s), f"tok/s at {2 * new}": round(b.tokens / b.wall_s),
                     f"shallow ratio {new} / {2 * new}": f"{a.shallow_ratio:.3f} / {b.shallow_ratio:.3f}",
                     f"ms at {new}: prefill / decode / rest": " / ".join(f"{v * 1e3:.2f}" for v in
                                                                         (a.prefill_s, a.decode_s, rest))})
    return rows


def hf_model(model: LegoLM) -> Any:
    """The deep model as a transformers model (checked against legolm in fp32), or None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    import tempfile

    from legolm.checkpoints.native import export_hf

    p = next(model.parameters())
    device, dtype = p.device, p.dtype
    with tempfile.TemporaryDirectory() as tmp:  # the user's path: export, then from_pretrained
        export_hf(model.float().cpu(), Path(tmp) / "hf")
        hf: Any = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf")
    hf.eval()
    x = torch.arange(1, 17)[None]
    with torch.no_grad():  # parity in fp32 before timing: the same deep model in both libraries
        ours = model(x)
        rel = ((hf(x).logits - ours).abs().max() / ours.abs().max()).item()
    model.to(device=device, dtype=dtype)
    print(f"HF export of the deep model: max |logit diff| / max |logit| = {rel:.2e} (fp32, CPU)")
    if rel > 1e-3:
        raise SystemExit(f"HF export of the deep model differs from legolm (relative {rel:.2e} > 1e-3)")
    return hf.to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "lego-gpu.yaml"))
    parser.add_argument("--corpus", default=str(BENCH_DATA / "lego-gutenberg-bpe4096"),
                        help="a load_tokenized folder written by prepare_data.py (its tokenizer must be the model's)")
    parser.add_argument("--name", default="grown", help="result file label")
    parser.add_argument("--hf-prompts", type=int, default=2, help="prompts Hugging Face generate decodes (slow)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps: checks it runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted, YAML value), e.g. lego.phase2_easy_weight=0.5; repeatable")
    args = parser.parse_args()
    data = merge(load_yaml(args.config), overrides(args.set))
    corpus_dir = Path(args.corpus)
    if args.smoke:
        data = merge(data, SMOKE)
    cfg = config_from_dict(LegoConfig, merge(data, {"run": {"overwrite": True}}))
    if not corpus_dir.is_dir():
        raise SystemExit(f"missing {corpus_dir}: run `python benchmarks/prepare_data.py` first (needs LEGOLM_DATA)")
    summary = lego.run(cfg, load_tokenized(corpus_dir))
    name = f"early_exit-{args.name}" + ("-smoke" if args.smoke else "")
    payload = {**device_info(), "config": dataclasses.asdict(cfg), "smoke": args.smoke, **summary, "references": None}
    if not args.smoke:  # the LEGO tables are kept even if the reference decoders below fail
        write_result(name, payload)
    model = load_pretrained(Path(cfg.run.out_dir) / "model", device=next_device(cfg))
    assert isinstance(model, LegoLM)
    model.to(STORE_DTYPES[cfg.decode.dtype])
    d = cfg.decode
    prompts = val_windows(load_tokenized(corpus_dir).val, d.prompts, d.prompt_len)
    fused = summary["rows"][0]["tok_per_s"]
    payload["references"] = refs = references(model, prompts, d.max_new_tokens, d.repeats, args.hf_prompts, fused,
                                              d.fused_kernel)
    print("\nmore full-depth decoders of the deep model (whole calls, batch 1, greedy, same prompts):")
    print_table(refs, ["decoder", "tok/s", "vs fused", "note"])
    payload["cost_split"] = split = cost_split(model, prompts, d.max_new_tokens, d.repeats, d.fused_kernel,
                                               d.draft_tokens)
    print(f"\ncost per token and per call (whole calls of {d.max_new_tokens} and {2 * d.max_new_tokens} new tokens, "
          f"calibrated τ {model.threshold:.4f}):")
    print_table(split, list(split[0]))
    if not args.smoke:
        print(f"results: {write_result(name, payload)}")
        for png in ("curve", "split_curve"):
            src = Path(cfg.run.out_dir) / f"{png}.png"
            if src.is_file():
                dst = RESULTS / f"{name}-{png.replace('_', '-')}-{date.today().isoformat()}.png"
                shutil.copyfile(src, dst)
                if os.environ.get("OUT"):
                    shutil.copyfile(src, Path(os.environ["OUT"]) / dst.name)


def next_device(cfg: LegoConfig) -> str:
    return cfg.run.device if cfg.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


if __name__ == "__main__":
    main()

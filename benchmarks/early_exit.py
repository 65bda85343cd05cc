"""LEGO early exit: measured decode speedup against full depth, same code, same process, at each threshold.

Trains a LEGO model on real text (TinyStories from ``.bench/``: phase 1, calibration, extension,
phase 2, all through `legolm lego`'s pipeline), then times greedy batch-1 decoding at every
threshold of the curve against the full-depth loop of the same code (`generate_with_early_exit`
with ``routing_threshold=None``). For reference, the deep model alone is also timed with legolm's
standard decoder (static cache + CUDA graph) and with Hugging Face ``generate`` (the deep model
exported to GPT-NeoX), greedy, same prompts.

    python benchmarks/prepare_data.py               # once, where the shared data is (writes .bench/)
    python -m benchmarks.early_exit                 # GPU: configs/lego-gpu.yaml
    python -m benchmarks.early_exit --smoke         # CPU: tiny model, a few steps; checks it runs
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import BENCH_DATA, ROOT, device_info, print_table, write_result
from legolm.checkpoints.load import load_pretrained
from legolm.cli.args import config_from_dict, load_yaml, merge
from legolm.data.tokenized import load_tokenized
from legolm.lego.config import STORE_DTYPES, LegoConfig
from legolm.lego.report import val_windows
from legolm.model.lego import LegoLM

CORPUS = BENCH_DATA / "lego-tinystories-bpe4096"
SMOKE = {"window": 64, "model": {"n_embd": 64, "n_head": 4, "block_size": 256},
         "phase1": {"max_steps": 4, "batch_size": 4, "eval": {"every": 2, "max_batches": 2}},
         "phase2": {"max_steps": 4, "batch_size": 4, "eval": {"every": 2, "max_batches": 2}},
         "lego": {"num_layers": 4, "calib_batches": 2, "curve_ratios": [0.3]},
         "decode": {"prompts": 1, "prompt_len": 8, "max_new_tokens": 8, "score_windows": 1, "score_len": 8,
                    "repeats": 1, "warmup": 0, "dtype": "float32"},
         "run": {"device": "cpu", "out_dir": "runs/lego-bench-smoke"}}


def references(model: LegoLM, prompts: torch.Tensor, new: int, repeats: int, tau: float) -> list[dict[str, Any]]:
    """Whole-call tok/s (prefill included), batch 1, greedy, same prompts: our loop at full depth and at τ,
    the deep model with legolm's standard decoder (CUDA graph on GPU), and with HF generate."""
    from legolm.generation import GenerationConfig, generate
    from legolm.generation.early_exit import generate_with_early_exit

    p0 = next(model.parameters())
    device, dtype = p0.device, p0.dtype
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = GenerationConfig(max_new_tokens=new, greedy=True, stop_at_eos=False)
    rows = [("legolm early-exit loop, full depth (threshold None)",
             lambda p: generate_with_early_exit(model, p, new, None)),
            (f"legolm early-exit loop, calibrated τ={tau:.3f}, kv fill",
             lambda p: generate_with_early_exit(model, p, new, tau)),
            ("legolm generate, deep model" + (" (CUDA graph)" if device.type == "cuda" else ""),
             lambda p: generate(model, p.tolist(), cfg))]
    hf = hf_model(model, device, dtype)
    model.to(device, dtype)  # hf_model compared on CPU in fp32
    if hf is not None:
        rows.append(("HF generate, deep model", lambda p: hf.generate(
            p, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
            attention_mask=torch.ones_like(p))))
    out = []
    for name, fn in rows:
        for row in prompts:  # warm-up (sessions, graph capture)
            fn(row[None].to(device))
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for row in prompts:
                fn(row[None].to(device))
            sync()
            times.append(time.perf_counter() - t0)
        out.append({"decoder": name, "tok/s": round(len(prompts) * new / statistics.median(times))})
    return out


def hf_model(model: LegoLM, device: torch.device, dtype: torch.dtype) -> Any:
    """The deep model as a transformers GPT-NeoX model, or None when transformers is missing."""
    try:
        import transformers
    except ImportError:
        return None
    import tempfile

    from legolm.checkpoints.native import export_hf

    with tempfile.TemporaryDirectory() as tmp:  # the user's path: export, then from_pretrained
        export_hf(model.float().cpu(), Path(tmp) / "hf")
        hf: Any = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf")
    hf.eval()
    x = torch.arange(1, 17)[None]
    with torch.no_grad():  # parity in fp32 before timing: the same deep model in both libraries
        ours = model.float().cpu()(x)
        rel = ((hf(x).logits - ours).abs().max() / ours.abs().max()).item()
    print(f"HF export of the deep model: max |logit diff| / max |logit| = {rel:.2e} (fp32, CPU)")
    if rel > 1e-3:
        raise SystemExit(f"HF export of the deep model differs from legolm (relative {rel:.2e} > 1e-3)")
    return hf.to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "lego-gpu.yaml"))
    parser.add_argument("--corpus", default=str(CORPUS), help="a load_tokenized folder (prepare_data.py)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, a few steps: checks it runs")
    args = parser.parse_args()
    data = load_yaml(args.config)
    if args.smoke:
        data = merge(data, SMOKE)
    cfg = config_from_dict(LegoConfig, merge(data, {"run": {"overwrite": True}}))
    if not Path(args.corpus).is_dir():
        raise SystemExit(f"missing {args.corpus}: run `python benchmarks/prepare_data.py` first (needs LEGOLM_DATA)")
    corpus = load_tokenized(args.corpus)
    from legolm.cli.lego import lego

    summary = lego(cfg, corpus)
    model = load_pretrained(Path(cfg.run.out_dir) / "model", device=cfg.run.device if cfg.run.device != "auto"
                            else ("cuda" if torch.cuda.is_available() else "cpu"))
    assert isinstance(model, LegoLM)
    model.to(STORE_DTYPES[cfg.decode.dtype])
    d = cfg.decode
    prompts = val_windows(corpus.val, d.prompts, d.prompt_len)
    payload = {**device_info(), "config": dataclasses.asdict(cfg), "smoke": args.smoke,
               **{k: v for k, v in summary.items() if k != "table"}, "table": summary["table"], "references": None}
    if not args.smoke:  # the LEGO table is kept even if the reference decoders below fail or run out of time
        write_result("early_exit", payload)
    payload["references"] = refs = references(model, prompts, d.max_new_tokens, d.repeats, summary["threshold"])
    print("\nwhole calls (prefill included), batch 1, greedy, same prompts:")
    print_table(refs, ["decoder", "tok/s"])
    if not args.smoke:
        print(f"results: {write_result('early_exit', payload)}")


if __name__ == "__main__":
    main()

"""Decode throughput: legolm vs Hugging Face `generate` and litgpt, same weights, same GPU, same process.

For each model shape (random weights of the real architecture, shared by every library), prompts
are windows of real text (Tiny Shakespeare); every run produces exactly ``--new-tokens`` greedy
tokens per row (no EOS stop). tok/s counts generated tokens over the whole call (prefill included),
with legolm's decoding session (static cache + captured graph) reused from the first call, as HF's
static cache reuses its compiled graphs; the first call's time (capture, compile) is reported apart.

litgpt (Pythia only: it has no GPT-2) decodes with its own ``litgpt.generate.base.generate`` on a
`litgpt.GPT` holding the same weights (litgpt's HF converter), its KV cache sized for prompt + new
tokens: "litgpt generate" eagerly, and at batch 1 "litgpt generate compile" as ``litgpt generate
--compile`` runs it (its ``next_token`` under ``torch.compile(mode="reduce-overhead")``, with its
dynamo/inductor settings); at batch > 1 its ``batched_generate_fn`` (eager; litgpt compiles only
the batch-1 path). Without litgpt its rows read "not installed" (benchmarks/peers.py).

    python benchmarks/prepare_data.py            # once, where the shared data is
    python -m benchmarks.decode --models gpt2 pythia-160m --batch 1 16
    python -m benchmarks.decode --smoke          # CPU, tiny shapes: legolm eager, HF, litgpt (aot_eager)
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import numpy as np
import torch

from benchmarks.common import device_info, hf_random_model, legolm_copy, print_table, real_tokens, timed, write_result
from benchmarks.peers import (
    LITGPT,
    LitgptDecoder,
    failure,
    litgpt_compile_settings,
    litgpt_model,
    litgpt_unsupported,
    missing,
)
from legolm.core.config import ModelConfig
from legolm.generation import GenerationConfig, generate
from legolm.generation.persistent import PersistentShape
from legolm.model.transformer import TransformerLM

TOKENIZER = {"gpt2": "gpt2", "gpt2-medium": "gpt2", "pythia-160m": "pythia", "pythia-70m": "pythia",
             "tiny-gpt2": "gpt2", "tiny-pythia": "pythia"}
SMOKE_MODELS = {"gpt2": "tiny-gpt2", "pythia-160m": "tiny-pythia"}


def build_pair(preset: str, dtype: torch.dtype, device: str = "cuda", litgpt: bool = False
               ) -> tuple[Any, TransformerLM, Any]:
    """An HF model with random weights of the preset's shape, legolm loaded from its state dict, and litgpt's `GPT`
    through litgpt's converter (or why there is none, a string; None when not asked for)."""
    config = ModelConfig.from_name(preset)
    hf = hf_random_model(config).to(device, dtype).eval()
    ours = legolm_copy(hf, config).eval()
    lit: Any = None
    if litgpt:
        why = missing(LITGPT) or litgpt_unsupported(config)
        try:
            lit = f"litgpt {why}" if why else litgpt_model(
                {k: v.detach().clone() for k, v in hf.state_dict().items()}, config).to(device, dtype).eval()
        except Exception as err:  # a peer that breaks is a row saying so
            lit = f"litgpt {failure(err)}"
    return hf, ours, lit


def prompts_for(preset: str, batch: int, length: int) -> list[list[int]]:
    ids = real_tokens(TOKENIZER[preset]).astype(np.int64) % ModelConfig.from_name(preset).vocab_size
    return [ids[i * 997: i * 997 + length].tolist() for i in range(batch)]


def run_litgpt(model: Any, prompts: list[list[int]], new: int, compile: bool, backend: str
               ) -> tuple[float, list[int], float]:
    """Steady-state seconds per call of litgpt's generate, the first row's tokens, and the first call's seconds."""
    idx = torch.tensor(prompts, device=next(model.parameters()).device)
    settings = litgpt_compile_settings() if compile else contextlib.nullcontext()
    with settings:
        decode = LitgptDecoder(model, len(prompts[0]), new, len(prompts), compile, backend)
        first, _ = timed(lambda: decode(idx), repeats=1, warmup=0)  # compiles (and captures) when compiled
        seconds, out = timed(lambda: decode(idx), repeats=3, warmup=2 if compile else 0)
    model.clear_kv_cache()
    return seconds, out[0], first


def run_hf(hf: Any, prompts: list[list[int]], new: int, static: bool) -> tuple[float, list[int]]:
    idx = torch.tensor(prompts, device=hf.device)
    kwargs: dict[str, Any] = dict(do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                                  attention_mask=torch.ones_like(idx))
    if static:  # transformers compiles the decode step itself when the cache is static
        kwargs["cache_implementation"] = "static"
    seconds, out = timed(lambda: hf.generate(idx, **kwargs), repeats=3, warmup=2 if static else 1)
    return seconds, out[0, idx.shape[1]:].tolist()


def run_ours(model: TransformerLM, prompts: list[list[int]], new: int, **decoder: Any) -> tuple[float, list[int],
                                                                                               float, float]:
    """Steady-state seconds per call (session and graph reused), tokens, the first call's seconds, and the
    prefill's seconds within a call; ``decoder``: the `GenerationConfig` switches of the variant."""
    cfg = GenerationConfig(max_new_tokens=new, greedy=True, stop_at_eos=False, **decoder)
    first, _ = timed(lambda: generate(model, prompts, cfg), repeats=1, warmup=0)  # builds the session
    seconds, out = timed(lambda: generate(model, prompts, cfg), repeats=3, warmup=0)
    return seconds, out.tokens[0], first, out.prefill_s


def agree(a: list[int], b: list[int]) -> int:
    """Length of the common greedy prefix (bf16 rounding makes long greedy runs drift apart)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2", "pythia-160m"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--hf-static", action=argparse.BooleanOptionalAction, default=True,
                        help="also time HF generate with a static cache + torch.compile")
    parser.add_argument("--litgpt", action=argparse.BooleanOptionalAction, default=True,
                        help="also time litgpt's generate (eager; compiled at batch 1)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend of the litgpt rows (default "
                        "inductor; aot_eager with --smoke)")
    parser.add_argument("--persistent-shapes", nargs="*", default=["8:8192:8192"], metavar="WARPS:TILE:HEAD_TILE",
                        help="launch shapes of the persistent fused step to time at batch 1 (warps per program, "
                        "weight elements per chunk of a block's GEMV and of the head)")
    parser.add_argument("--graph-steps", type=int, default=GenerationConfig.graph_steps,
                        help="greedy decode steps per CUDA graph replay of legolm's graph rows (1 = one step a replay)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, fp32: legolm eager, HF, litgpt")
    args = parser.parse_args()
    device, dtype = "cuda", torch.bfloat16
    if args.smoke:
        args.models = [SMOKE_MODELS.get(m, m) for m in args.models]
        args.batch, args.prompt_tokens, args.new_tokens, args.hf_static = [1, 2], 8, 6, False
        args.compile_backend = args.compile_backend or "aot_eager"
        device, dtype = "cpu", torch.float32
    args.compile_backend = args.compile_backend or "inductor"
    rows: list[dict[str, Any]] = []
    for preset in args.models:
        hf, ours, lit = build_pair(preset, dtype, device, args.litgpt)
        for batch in args.batch:
            prompts = prompts_for(preset, batch, args.prompt_tokens)
            n_tok = batch * args.new_tokens
            t_hf, ref = run_hf(hf, prompts, args.new_tokens, static=False)
            variants = {"legolm eager": dict(cuda_graph=False), "legolm cuda-graph": dict(cuda_graph=True),
                        "legolm compile+graph": dict(cuda_graph=True, compile=True)}
            if batch == 1:  # the fused Triton step decodes one sequence
                variants["legolm fused triton+graph, no PDL"] = dict(fused=True, fused_pdl=False)
                variants["legolm fused triton+graph"] = dict(fused=True)
                variants["legolm fused split-k"] = dict(fused=True, fused_kernel="splitk")
                variants["legolm fused split-k, exact sums"] = dict(fused=True, fused_kernel="splitk-exact")
                for spec in args.persistent_shapes:
                    warps, tile, head_tile = (int(v) for v in spec.split(":"))
                    shape = PersistentShape(num_warps=warps, tile=tile, head_tile=head_tile)
                    variants[f"legolm fused persistent {spec}"] = dict(fused=True, fused_kernel="persistent",
                                                                       fused_persistent=shape)
            if args.smoke:  # graphs, compiled steps and Triton kernels are GPU paths
                variants = {"legolm eager": dict(cuda_graph=False)}
            results = {"hf generate": (t_hf, ref)}
            notes: dict[str, str] = {}
            first_call: dict[str, float] = {}
            prefill: dict[str, float] = {}
            for name, decoder in variants.items():
                print(f"  timing {name} ...", flush=True)
                sec, toks, first_call[name], prefill[name] = run_ours(ours, prompts, args.new_tokens,
                                                                      graph_steps=args.graph_steps, **decoder)
                results[name] = (sec, toks)
            if args.hf_static:
                try:
                    results["hf static+compile"] = run_hf(hf, prompts, args.new_tokens, static=True)
                except Exception as err:  # a peer configuration that fails is reported, not fatal
                    print(f"hf static+compile failed on {preset} batch {batch}: {str(err).splitlines()[0]}")
            lit_rows = {"litgpt generate": False, "litgpt generate compile": True} if batch == 1 \
                else {"litgpt batched_generate_fn": False}
            for name, comp in lit_rows.items() if lit is not None else ():
                if isinstance(lit, str):
                    notes[name] = lit
                    continue
                print(f"  timing {name} ...", flush=True)
                try:
                    sec, toks, first_call[name] = run_litgpt(lit, prompts, args.new_tokens, comp, args.compile_backend)
                    results[name] = (sec, toks)
                except Exception as err:  # a peer configuration that fails is reported, not fatal
                    notes[name] = f"litgpt {failure(err)}"
                    print(f"{name} failed on {preset} batch {batch}: {notes[name]}")
            for name, (sec, toks) in results.items():
                print(f"{preset} batch {batch} {name}: {n_tok / sec:,.0f} tok/s", flush=True)
                rows.append({"model": preset, "batch": batch, "impl": name, "tok/s": f"{n_tok / sec:,.0f}",
                             "ms/step": f"{1000 * sec / args.new_tokens:.2f}",
                             "vs hf": f"{t_hf / sec:.1f}x", "greedy agree": f"{agree(toks, ref)}/{len(ref)}",
                             "first call s": f"{first_call[name]:.2f}" if name in first_call else "",
                             "prefill ms": f"{1000 * prefill[name]:.1f}" if name in prefill else ""})
            for name, why in notes.items():
                rows.append({"model": preset, "batch": batch, "impl": name, "note": why})
            if not args.smoke:
                save(rows, args, complete=False)  # a run cut short still leaves the rows measured so far
        del hf, ours, lit
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"\nDecode, {args.prompt_tokens}-token real-text prompts, {args.new_tokens} new tokens, {dtype}, "
          f"{device_info()['device']}")
    if args.smoke:  # a crash check, not a measurement: nothing goes to benchmarks/results
        print_table(rows, COLUMNS)
        return
    print(f"wrote {save(rows, args, complete=True)}")


COLUMNS = ["model", "batch", "impl", "tok/s", "ms/step", "vs hf", "greedy agree", "first call s", "prefill ms", "note"]


def save(rows: list[dict[str, Any]], args: argparse.Namespace, complete: bool) -> Any:
    """Print (when complete) and write the table; ``complete`` False marks a partial result."""
    columns = COLUMNS
    table = print_table(rows, columns) if complete else ""
    return write_result("decode", {**device_info(), "args": vars(args), "complete": complete, "rows": rows,
                                   "table": table})


if __name__ == "__main__":
    main()

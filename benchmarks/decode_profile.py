"""Where a decode step's time goes: graph replay time, kernels per step and the costliest kernels.

A development tool for the decode fast path (the peer comparison is `benchmarks.decode`). For each
variant it reports the median time of one CUDA-graph replay (the steady-state cost of a token), the
whole `generate` call with a reused session, and, from the profiler on the same step run without a
graph, how many kernels one step launches and their summed GPU time.

    python -m benchmarks.decode_profile --models gpt2 --batch 1 16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import legolm.generation.decoder as decoder_mod
import legolm.layers.attention as attention_mod
from benchmarks.common import device_info, print_table, timed, write_result
from benchmarks.decode import prompts_for
from legolm.core.config import ModelConfig
from legolm.generation import GenerationConfig, generate
from legolm.generation.decoder import DecodeSession
from legolm.generation.fused import FusedBlocks, FusedDecodeStep
from legolm.generation.generate import _SESSIONS
from legolm.model.transformer import TransformerLM


def manual_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, enable_gqa: bool = False) -> torch.Tensor:
    """Attention as plain ops, so inductor can fuse the softmax with its neighbours."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (B, H, T, S)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf"))
    return (s.softmax(-1).to(v.dtype) @ v)


class _F:
    """`torch.nn.functional` with attention swapped for `manual_sdpa`."""

    def __getattr__(self, name: str) -> Any:
        return manual_sdpa if name == "scaled_dot_product_attention" else getattr(F, name)


@dataclass(frozen=True)
class Variant:
    """One way of building the decode step."""

    compile: bool
    manual: bool = False  # attention as plain ops instead of SDPA
    cd: bool = False  # inductor's coordinate-descent tuning
    mode: str = "default"  # torch.compile mode
    sdpa: str | None = None  # force one SDPA backend (SDPBackend name), e.g. FLASH_ATTENTION
    fused: bool = False  # the fused Triton step (batch 1 only)
    pdl: bool = True  # its kernels launched as programmatic dependents (where supported)
    split_k: bool = False  # its blocks in three launches (`legolm.kernels.splitk`)
    exact: bool = False  # their split-K sums exact (int64 fixed point) instead of fp32 atomics


def kernel_name(v: Variant) -> FusedBlocks:
    """The `GenerationConfig.fused_kernel` of a fused variant."""
    if not v.split_k:
        return "blocks"
    return "splitk-exact" if v.exact else "splitk"


def sdpa_backend(name: str | None) -> contextlib.AbstractContextManager[Any]:
    """Restrict `scaled_dot_product_attention` to one backend while the step is traced and captured."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, name)) if name else contextlib.nullcontext()


def set_variant(manual_attention: bool, coordinate_descent: bool) -> None:
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    decoder_mod._compiled_steps.clear()
    _SESSIONS.clear()  # generate's cached sessions hold graphs captured under the previous variant
    attention_mod.F = _F() if manual_attention else F  # type: ignore[assignment]
    inductor_config.coordinate_descent_tuning = coordinate_descent


def replay_ms(session: DecodeSession, steps: int) -> float:
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        session.step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        session.state.slot.fill_(70)  # stay inside the cache: steady state at a fixed length
    return statistics.median(times)


def kernel_profile(session: DecodeSession, steps: int) -> tuple[float, float, list[tuple[str, float, int]]]:
    """Kernels per step, GPU ms per step, and the top kernels (name, ms/step, count/step)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        session.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            session.step()
            session.state.slot.fill_(70)
        torch.cuda.synchronize()
    per: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name].append(ev.device_time_total / 1000)
    count = sum(len(v) for v in per.values()) / steps
    total = sum(sum(v) for v in per.values()) / steps
    top = sorted(((n[:60], sum(v) / steps, len(v) // steps) for n, v in per.items()), key=lambda r: -r[1])[:12]
    return count, total, top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--variants", nargs="+",
                        default=["graph", "compile", "fused"])
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    autotune = "max-autotune-no-cudagraphs"  # Triton GEMV templates with fused epilogues
    variants = {"graph": Variant(False), "compile": Variant(True), "compile+autotune": Variant(True, mode=autotune),
                "compile+manual": Variant(True, manual=True), "compile+manual+cd": Variant(True, True, True),
                # no flash variant: the static cache's decode step attends under a mask, which flash cannot take
                "compile+cd": Variant(True, cd=True), "compile+efficient": Variant(True, sdpa="EFFICIENT_ATTENTION"),
                "fused": Variant(False, fused=True), "fused-nopdl": Variant(False, fused=True, pdl=False),
                "fused-splitk": Variant(False, fused=True, split_k=True),
                "fused-splitk-exact": Variant(False, fused=True, split_k=True, exact=True)}
    rows: list[dict[str, Any]] = []
    for preset in args.models:
        torch.manual_seed(0)
        model = TransformerLM(ModelConfig.from_name(preset)).to("cuda", torch.bfloat16).eval()
        rows += profile_model(model, preset, args, variants)
        del model
        torch.cuda.empty_cache()
    table = print_table(rows, list(rows[0]))
    write_result("decode-profile", {**device_info(), "args": vars(args), "rows": rows, "table": table})


def profile_model(model: TransformerLM, preset: str, args: argparse.Namespace,
                  variants: dict[str, Variant]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in args.variants:
        v = variants[name]
        comp = v.compile
        set_variant(v.manual, v.cd)
        for batch in [b for b in args.batch if b == 1 or not v.fused]:
            prompts = prompts_for(preset, batch, 64)  # real text (Tiny Shakespeare)
            cfg = GenerationConfig(max_new_tokens=args.new_tokens, greedy=True, stop_at_eos=False,
                                   compile=comp, compile_mode=v.mode, fused=v.fused, fused_pdl=v.pdl,
                                   fused_kernel=kernel_name(v))

            def step(cfg: GenerationConfig = cfg, v: Variant = v) -> FusedDecodeStep | None:
                return FusedDecodeStep(model, cfg.fused_attention_block, cfg.fused_embed_block,
                                       pdl=cfg.fused_pdl, split_k=v.split_k, exact_sums=v.exact) if v.fused else None

            with torch.inference_mode(), sdpa_backend(v.sdpa):
                sec, _ = timed(lambda cfg=cfg, prompts=prompts: generate(model, prompts, cfg), repeats=3)
                session = DecodeSession(model, batch, 512, True, None, cuda_graph=True, compile=comp,
                                        compile_mode=v.mode, step=step())
                session.prefill(torch.tensor(prompts, device="cuda"), torch.full((batch,), 64, device="cuda"))
                session.start(torch.zeros(batch, dtype=torch.long, device="cuda"), 64,
                              torch.full((batch,), 64, device="cuda"))
                ms = replay_ms(session, 200)
                if isinstance(session.fn, FusedDecodeStep):
                    print("    tuned µs per launch:", {k: round(t, 2) for k, t in session.fn.tuning.items()})
                    st = session.fn.stack
                    print("    launch shapes:", st.configs, st.attention_config,
                          st.split_shapes if st.split_k else "")
                eager = DecodeSession(model, batch, 512, True, None, cuda_graph=False, compile=comp,
                                      compile_mode=v.mode, step=step())
                eager.state.slot.fill_(70)
                count, gpu_ms, top = kernel_profile(eager, 20)
            row = {"model": preset, "variant": name, "batch": batch,
                   "generate tok/s": f"{batch * args.new_tokens / sec:,.0f}",
                   "replay ms": f"{ms:.3f}", "replay tok/s": f"{batch / ms * 1000:,.0f}",
                   "kernels/step": f"{count:.0f}", "kernel ms/step": f"{gpu_ms:.3f}"}
            rows.append(row)
            print(row, flush=True)
            for kname, kms, kcount in top:
                print(f"    {kms * 1000:8.1f} us  x{kcount:<4d} {kname}", flush=True)
    return rows


if __name__ == "__main__":
    main()

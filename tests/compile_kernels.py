"""Compile each fused decode kernel specialization for sm_90 without a GPU (run by test_fused_decode)."""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

import legolm.kernels.cross_entropy as kce
import legolm.kernels.decode as kd
import legolm.kernels.persistent as kp
import legolm.kernels.rows as kr
import legolm.kernels.splitk as ks

P = "*bf16"
GEMV = dict(x_ptr="*fp32", nw_ptr=P, nb_ptr=P, w1_ptr=P, b1_ptr=P, w2_ptr=P, b2_ptr=P, w3_ptr=P, b3_ptr=P,
            wu_ptr=P, bu_ptr=P, res_ptr="*fp32", out_ptr="*fp32", pmax_ptr="*fp32", pidx_ptr="*i32", psum_ptr="*fp32",
            N1="i32", N2="i32", N="i32", K="i32", eps="fp32", stride_x="i32", stride_out="i32", stride_p="i32")
ATTENTION = dict(qkv_ptr="*fp32", k_cache_ptr=P, v_cache_ptr=P, rope_ptr="*fp32", out_ptr=P, slot_ptr="*i64",
                 pos_ptr="*i64", S="i32", rope_len="i32", scale="fp32", q_width="i32")
ADVANCE = dict(pmax_ptr="*fp32", pidx_ptr="*i32", n_parts="i32", tok_ptr="*i64", tokens_ptr="*i64", t_ptr="*i64",
               slot_ptr="*i64", pos_ptr="*i64", finished_ptr="*i8", eos_id="i32")
EMBED = dict(tok_ptr="*i64", pos_ptr="*i64", wte_ptr=P, wpe_ptr=P, out_ptr="*fp32", C="i32")
EXIT = dict(pmax_ptr="*fp32", pidx_ptr="*i32", psum_ptr="*fp32", n_parts="i32", tau_ptr="*fp32", deep_ptr="*i8",
            exited_ptr="*i8", tok_ptr="*i64", tokens_ptr="*i64", t_ptr="*i64", finished_ptr="*i8", eos_id="i32",
            q_ptr="*i64", buckets_ptr="*i64", flush_ptr="*i8", n_buckets="i32", pos_ptr="*i64")
EMIT = dict(pmax_ptr="*fp32", pidx_ptr="*i32", n_parts="i32", tok_ptr="*i64", tokens_ptr="*i64", t_ptr="*i64",
            finished_ptr="*i8", eos_id="i32", counter_ptr="*i64", pos_ptr="*i64")
TICK = dict(pos_ptr="*i64", q_ptr="*i64", flush_ptr="*i8", n_buckets="i32", count_ptr="*i64")
KV_ROWS = dict(qkv_ptr="*fp32", k_cache_ptr=P, v_cache_ptr=P, rope_ptr="*fp32", start_ptr="*i64", S="i32",
               rope_len="i32", q_width="i32")
GATHER = dict(src_ptr="*fp32", dst_ptr="*fp32", start_ptr="*i64", pos_ptr="*i64", q_ptr="*i64", ring="i32",
              C="i32")
PUT = dict(src_ptr="*fp32", ring_ptr="*fp32", pos_ptr="*i64", ring="i32", C="i32")
SELECT = dict(src_ptr="*fp32", dst_ptr="*fp32", row_ptr="*i64", C="i32")
ACCEPT = dict(pmax_ptr="*fp32", pidx_ptr="*i32", n_parts="i32", stride_p="i32", drafts_ptr="*i64", T="i32",
              tok_ptr="*i64", tokens_ptr="*i64", t_ptr="*i64", finished_ptr="*i8", eos_id="i32", pos_ptr="*i64",
              dpos_ptr="*i64", start_ptr="*i64", di_ptr="*i64", stats_ptr="*i64", limit_ptr="*i64", live_ptr="*i8")
PERSISTENT = dict(tab_ptr="*i64", wte_ptr=P, wpe_ptr=P, fnw_ptr=P, fnb_ptr=P, head_w_ptr=P, head_b_ptr=P,
                  rope_ptr="*fp32", x_ptr="*fp32", h_ptr="*fp32", qkv_ptr="*fp32", attn_ptr=P, act_ptr=P,
                  logits_ptr="*fp32", pmax_ptr="*fp32", pidx_ptr="*i32", sync_ptr="*i32", tok_ptr="*i64",
                  tokens_ptr="*i64", t_ptr="*i64", slot_ptr="*i64", pos_ptr="*i64", finished_ptr="*i8", eos_id="i32",
                  n_layer="i32", C="i32", N1="i32", N2="i32", QW="i32", F="i32", V="i32", S="i32", rope_len="i32",
                  scale="fp32", eps_1="fp32", eps_2="fp32", eps_f="fp32")
PERSISTENT_BLOCKS = dict(NS=kp.NS, BLOCK_T=64, BLOCK_C=1024, C_POW2=1024, BN_QKV=32, BK_QKV=256, BN_PROJ=8,
                         BK_PROJ=1024, BN_UP=32, BK_UP=256, BN_DOWN=8, BK_DOWN=1024, BN_HEAD=32, BK_HEAD=256, GREEDY=1,
                         HAS_EOS=1, BLOCK_P=256)
CE = dict(logits_ptr=P, labels_ptr="*i64", loss_ptr="*fp32", lse_ptr="*fp32", V="i32", W="i32", stride="i32",
          ignore_index="i32")
CE_COLUMNS = dict(logits_ptr=P, labels_ptr="*i64", lse_ptr="*fp32", v0="i32", m="i32", stride="i32",
                  ignore_index="i32")
# split-K's residual stream: fp32 ("splitk") or int64 fixed point ("splitk-exact", `legolm.kernels.decode.FIXED_BITS`)
QKV_PREP = dict(x_ptr="*i64", tok_ptr="*i64", pos_ptr="*i64", wte_ptr=P, wpe_ptr=P, nw_ptr=P, nb_ptr=P, w1_ptr=P,
                b1_ptr=P, w2_ptr=P, b2_ptr=P, w3_ptr=P, b3_ptr=P, out_ptr="*fp32", pb_ptr=P, h_ptr="*i64",
                zero_ptr="*i64", N1="i32", N2="i32", N="i32", K="i32", eps="fp32")
ATTENTION_PROJ = dict(qkv_ptr="*fp32", k_cache_ptr=P, v_cache_ptr=P, rope_ptr="*fp32", wp_ptr=P, h_ptr="*i64",
                      slot_ptr="*i64", pos_ptr="*i64", S="i32", rope_len="i32", scale="fp32", C="i32", q_width="i32")
MLP = dict(x_ptr="*i64", nw_ptr=P, nb_ptr=P, wg_ptr=P, bg_ptr=P, wu_ptr=P, bu_ptr=P, wd_ptr=P, bd_ptr=P,
           res_ptr="*i64", out_ptr="*i64", F="i32", C="i32", eps="fp32")
MLP_FP32 = {**MLP, "x_ptr": "*fp32", "res_ptr": "*fp32", "out_ptr": "*fp32"}  # the kernels follow their buffers
QKV_PREP_FP32 = {**QKV_PREP, "x_ptr": "*fp32", "h_ptr": "*fp32", "zero_ptr": "*fp32"}
ATTENTION_PROJ_FP32 = {**ATTENTION_PROJ, "h_ptr": "*fp32"}
GEMV_FIXED = {**GEMV, "x_ptr": "*i64", "res_ptr": "*i64", "out_ptr": "*i64"}  # a split-K stack's rows and heads
GEMV_BLOCKS = dict(BLOCK_N=8, BLOCK_K=256, K_POW2=1024, PDL=0)
SPECS = [
    (kd.gemv_kernel, GEMV, dict(NORM=1, ACT=0, HAS_BIAS=1, HAS_RES=0, ARGMAX=0, SUMEXP=0, **GEMV_BLOCKS)),  # LN->qkv
    (kd.gemv_kernel, GEMV, dict(NORM=0, ACT=0, HAS_BIAS=1, HAS_RES=1, ARGMAX=0, SUMEXP=0, **GEMV_BLOCKS)),  # + res
    (kd.gemv_kernel, GEMV, dict(NORM=1, ACT=2, HAS_BIAS=1, HAS_RES=0, ARGMAX=0, SUMEXP=0, **GEMV_BLOCKS)),  # tanh GELU
    (kd.gemv_kernel, GEMV, dict(NORM=2, ACT=3, HAS_BIAS=0, HAS_RES=0, ARGMAX=0, SUMEXP=0, **GEMV_BLOCKS)),  # SwiGLU
    (kd.gemv_kernel, GEMV, dict(NORM=1, ACT=1, HAS_BIAS=0, HAS_RES=0, ARGMAX=1, SUMEXP=0, **GEMV_BLOCKS)),  # head
    (kd.gemv_kernel, GEMV, dict(NORM=2, ACT=0, HAS_BIAS=0, HAS_RES=0, ARGMAX=1, SUMEXP=1, **GEMV_BLOCKS)),  # exit head
    (kd.attention_kernel, ATTENTION, dict(H=12, HKV=12, D=64, D_POW2=64, R=0, BLOCK_T=64, WRITE=1, PDL=0)),  # GPT-2
    (kd.attention_kernel, ATTENTION, dict(H=12, HKV=12, D=64, D_POW2=64, R=16, BLOCK_T=64, WRITE=1, PDL=0)),  # Pythia
    (kd.attention_kernel, ATTENTION, dict(H=9, HKV=3, D=64, D_POW2=64, R=64, BLOCK_T=128, WRITE=1, PDL=0)),  # GQA
    (kd.attention_kernel, ATTENTION, dict(H=9, HKV=3, D=64, D_POW2=64, R=64, BLOCK_T=128, WRITE=0, PDL=0)),  # rows
    (kd.gemv_kernel, GEMV, dict(NORM=1, ACT=0, HAS_BIAS=1, HAS_RES=0, ARGMAX=0, SUMEXP=0, BLOCK_N=8, BLOCK_K=256,
                                K_POW2=1024, PDL=1)),  # programmatic dependent launch: griddepcontrol in the PTX
    (kd.attention_kernel, ATTENTION, dict(H=12, HKV=12, D=64, D_POW2=64, R=16, BLOCK_T=64, WRITE=1, PDL=1)),
    (kd.advance_kernel, ADVANCE, dict(GREEDY=1, HAS_EOS=1, BLOCK=4096, PDL=1)),
    (kd.embed_kernel, EMBED, dict(HAS_WPE=1, BLOCK=1024)),
    (kd.exit_kernel, EXIT, dict(HAS_EOS=1, FILL=1, ADVANCE=0, BLOCK=4096, BLOCK_B=4, PDL=0)),
    (kd.exit_kernel, EXIT, dict(HAS_EOS=0, FILL=0, ADVANCE=1, BLOCK=4096, BLOCK_B=1, PDL=1)),
    (kd.emit_kernel, EMIT, dict(HAS_EOS=1, HAS_COUNTER=1, HAS_POS=1, BLOCK=4096, PDL=1)),
    (kd.tick_kernel, TICK, dict(FILL=1, BLOCK_B=4)),
    (kr.kv_rows_kernel, KV_ROWS, dict(H=9, HKV=3, D=64, D_POW2=64, R=64)),
    (kr.gather_rows_kernel, GATHER, dict(BLOCK=1024)),
    (kr.put_row_kernel, PUT, dict(BLOCK=1024)),
    (kr.select_row_kernel, SELECT, dict(BLOCK=1024)),
    (kr.accept_kernel, ACCEPT, dict(HAS_EOS=1, BLOCK_T=8, BLOCK=4096)),
    (kce.ce_grad_kernel, CE, dict(BLOCK_V=4096)),
    (kce.ce_grad_columns_kernel, CE_COLUMNS, dict(BLOCK=1024)),
    (ks.qkv_prep_kernel, QKV_PREP, dict(NORM=1, HAS_BIAS=1, HAS_PB=1, EMBED=0, ADD_WPE=0, BLOCK_N=8, BLOCK_K=256,
                                        K_POW2=1024, PREP=8, PDL=1)),
    (ks.qkv_prep_kernel, QKV_PREP, dict(NORM=1, HAS_BIAS=1, HAS_PB=1, EMBED=1, ADD_WPE=1, BLOCK_N=8, BLOCK_K=1024,
                                        K_POW2=1024, PREP=8, PDL=1)),  # GPT-2's first block
    (ks.attention_proj_kernel, ATTENTION_PROJ, dict(H=12, HKV=12, D=64, D_POW2=64, R=16, BLOCK_T=64, ROWS=128,
                                                    WRITE=1, PDL=1)),  # Pythia
    (ks.attention_proj_kernel, ATTENTION_PROJ, dict(H=9, HKV=3, D=64, D_POW2=64, R=64, BLOCK_T=64, ROWS=128,
                                                    WRITE=1, PDL=0)),  # SmolLM2
    (ks.attention_proj_kernel, ATTENTION_PROJ, dict(H=12, HKV=12, D=64, D_POW2=64, R=16, BLOCK_T=64, ROWS=128,
                                                    WRITE=0, PDL=1)),  # a row pass
    (ks.mlp_kernel, MLP, dict(NORM=1, ACT=2, HAS_BIAS=1, HAS_DOWN_BIAS=1, BLOCK_N=32, BLOCK_K=256, K_POW2=1024,
                              BLOCK_C=128, PDL=1)),  # GPT-2
    (ks.mlp_kernel, MLP, dict(NORM=2, ACT=3, HAS_BIAS=0, HAS_DOWN_BIAS=0, BLOCK_N=32, BLOCK_K=256, K_POW2=1024,
                              BLOCK_C=128, PDL=0)),  # SmolLM2
    (ks.qkv_prep_kernel, QKV_PREP_FP32, dict(NORM=1, HAS_BIAS=1, HAS_PB=1, EMBED=1, ADD_WPE=1, BLOCK_N=8,
                                             BLOCK_K=1024, K_POW2=1024, PREP=8, PDL=1)),
    (ks.attention_proj_kernel, ATTENTION_PROJ_FP32, dict(H=12, HKV=12, D=64, D_POW2=64, R=16, BLOCK_T=64, ROWS=128,
                                                         WRITE=1, PDL=1)),
    (ks.mlp_kernel, MLP_FP32, dict(NORM=1, ACT=2, HAS_BIAS=1, HAS_DOWN_BIAS=1, BLOCK_N=32, BLOCK_K=256, K_POW2=1024,
                                   BLOCK_C=128, PDL=1)),
    (kd.gemv_kernel, GEMV_FIXED, dict(NORM=0, ACT=0, HAS_BIAS=1, HAS_RES=1, ARGMAX=0, SUMEXP=0, **GEMV_BLOCKS)),
    (kp.persistent_step_kernel, PERSISTENT, dict(  # GPT-2
        NORM_1=1, NORM_2=1, NORM_F=1, ACT=2, QKV_BIAS=1, PROJ_BIAS=1, UP_BIAS=1, DOWN_BIAS=1, HEAD_BIAS=0, HAS_WPE=1,
        PARALLEL=0, H=12, HKV=12, D=64, D_POW2=64, R=0, **PERSISTENT_BLOCKS)),
    (kp.persistent_step_kernel, PERSISTENT, dict(  # Pythia: parallel residual, partial RoPE
        NORM_1=1, NORM_2=1, NORM_F=1, ACT=1, QKV_BIAS=1, PROJ_BIAS=1, UP_BIAS=1, DOWN_BIAS=1, HEAD_BIAS=0, HAS_WPE=0,
        PARALLEL=1, H=12, HKV=12, D=64, D_POW2=64, R=16, **PERSISTENT_BLOCKS)),
    (kp.persistent_step_kernel, PERSISTENT, dict(  # SmolLM2: split q/k/v, GQA, SwiGLU, RMSNorm
        NORM_1=2, NORM_2=2, NORM_F=2, ACT=3, QKV_BIAS=0, PROJ_BIAS=0, UP_BIAS=0, DOWN_BIAS=0, HEAD_BIAS=0, HAS_WPE=0,
        PARALLEL=0, H=9, HKV=3, D=64, D_POW2=64, R=64, **PERSISTENT_BLOCKS)),
]
# What Triton's launcher specializes at a real launch: pointers and sizes that are multiples of 16
ALIGNED = ("N1", "N2", "N", "K", "C", "QW", "F", "V", "S", "stride_x", "stride_out")
VECTORIZED = (kd.gemv_kernel, kp.persistent_step_kernel, ks.qkv_prep_kernel, ks.attention_proj_kernel,
              ks.mlp_kernel)  # weight tiles must load 16 bytes per thread at a time

if __name__ == "__main__":
    for fn, signature, consts in SPECS:
        names = list(signature)
        attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in names if k.endswith("_ptr") or k in ALIGNED}
        src = ASTSource(fn, {**signature, **{k: "constexpr" for k in consts}}, consts, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        assert ".entry " + fn.__name__ in ptx, f"{fn.__name__}: no entry point in the PTX"
        assert fn not in VECTORIZED or "ld.global.v4.b32" in ptx, f"{fn.__name__}: weight loads not vectorized"
        assert ("griddepcontrol.wait" in ptx) == bool(consts.get("PDL")), f"{fn.__name__}: PDL {consts.get('PDL')}"
        exact = signature.get("out_ptr", signature.get("h_ptr")) == "*i64"  # split-K: integer atomic adds
        if fn in (ks.attention_proj_kernel, ks.mlp_kernel):
            assert (".add.u64" in ptx or ".add.s64" in ptx) == exact, f"{fn.__name__}: integer atomics {exact}"
        print("compiled", fn.__name__, consts, flush=True)

"""Causal self-attention through `scaled_dot_product_attention`, with RoPE, GQA and a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from legolm.core.config import ModelConfig
from legolm.core.context import LayerContext
from legolm.core.kv_cache import KVStore
from legolm.core.rope import apply_rope


class SplitQKV(nn.Module):
    """Separate q/k/v projections (Llama) behaving like one fused projection.

    Kept separate so adapters can target ``q_proj``/``v_proj`` alone, as PEFT does on Llama.
    """

    def __init__(self, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q_proj, k_proj, v_proj

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head / grouped-query causal attention.

    Args:
        qkv: Maps (B, T, C) to (B, T, (H + 2·H_kv)·D) laid out as [q heads | k heads | v heads]:
            one fused `nn.Linear` (GPT-2, Pythia) or a `SplitQKV` (Llama).
        proj: Output projection (B, T, H·D) -> (B, T, C).
        n_head: Query heads H.
        n_kv_head: Key/value heads H_kv (H_kv < H: grouped-query attention).
        head_dim: D.
    """

    def __init__(self, qkv: nn.Module, proj: nn.Module, n_head: int, n_kv_head: int, head_dim: int) -> None:
        super().__init__()
        self.qkv, self.proj = qkv, proj
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim

    def forward(self, x: Tensor, ctx: LayerContext, cache: KVStore | None = None) -> Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        qk, v = self.qkv(x).split([(H + Hkv) * D, Hkv * D], dim=-1)
        qk, v = qk.view(B, T, H + Hkv, D), v.view(B, T, Hkv, D)
        if ctx.cos is not None and ctx.sin is not None:
            qk = apply_rope(qk, ctx.cos, ctx.sin)  # q and k in one call, in (B, T, heads, D)
        q, k = qk.split([H, Hkv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D)
        if cache is not None:
            assert ctx.input_pos is not None, "a KV cache needs input_pos"
            k, v = cache.update(ctx.input_pos, k, v)  # (B, Hkv, S, D)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.attn_bias, is_causal=ctx.attn_bias is None, enable_gqa=Hkv != H
        )  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))


def fused_attention(config: ModelConfig) -> CausalSelfAttention:
    """Multi-head attention with one fused qkv projection (GPT-2, GPT-NeoX)."""
    C, H, D = config.n_embd, config.n_head, config.hd
    qkv = nn.Linear(C, 3 * H * D, bias=config.attn_bias)
    return CausalSelfAttention(qkv, nn.Linear(H * D, C, bias=config.attn_bias), H, H, D)


def split_attention(config: ModelConfig) -> CausalSelfAttention:
    """Grouped-query attention with separate q/k/v projections (Llama)."""
    C, H, Hkv, D = config.n_embd, config.n_head, config.kv_heads, config.hd
    qkv = SplitQKV(
        nn.Linear(C, H * D, bias=config.attn_bias),
        nn.Linear(C, Hkv * D, bias=config.attn_bias),
        nn.Linear(C, Hkv * D, bias=config.attn_bias),
    )
    return CausalSelfAttention(qkv, nn.Linear(H * D, C, bias=config.attn_bias), H, Hkv, D)

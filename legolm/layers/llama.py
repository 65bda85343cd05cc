"""Llama block (Touvron et al. 2023): RMSNorm, RoPE, grouped-query attention, SwiGLU MLP."""

from __future__ import annotations

from torch import nn

from legolm.core.config import ModelConfig
from legolm.layers.attention import split_attention
from legolm.layers.blocks import SequentialBlock
from legolm.layers.mlp import swiglu_mlp
from legolm.layers.norms import make_norm


def build(config: ModelConfig, layer_idx: int) -> nn.Module:
    return SequentialBlock(make_norm(config), split_attention(config), make_norm(config), swiglu_mlp(config))

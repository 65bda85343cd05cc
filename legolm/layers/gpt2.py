"""GPT-2 block (Radford et al. 2019): LayerNorm, fused-qkv attention, tanh-GELU MLP, sequential residual."""

from __future__ import annotations

from torch import nn

from legolm.core.config import ModelConfig
from legolm.layers.attention import fused_attention
from legolm.layers.blocks import SequentialBlock
from legolm.layers.mlp import gelu_mlp
from legolm.layers.norms import make_norm


def build(config: ModelConfig, layer_idx: int) -> nn.Module:
    return SequentialBlock(make_norm(config), fused_attention(config), make_norm(config), gelu_mlp(config))

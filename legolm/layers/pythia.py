"""GPT-NeoX / Pythia block (Biderman et al. 2023): partial RoPE, parallel residual, exact GELU.

The rotary fraction comes from ``config.rotary_pct`` (0.25 in every Pythia model).
"""

from __future__ import annotations

from torch import nn

from legolm.core.config import ModelConfig
from legolm.layers.attention import fused_attention
from legolm.layers.blocks import ParallelBlock
from legolm.layers.mlp import gelu_mlp
from legolm.layers.norms import make_norm


def build(config: ModelConfig, layer_idx: int) -> nn.Module:
    return ParallelBlock(make_norm(config), fused_attention(config), make_norm(config), gelu_mlp(config))

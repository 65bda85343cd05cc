"""Normalisation parts."""

from __future__ import annotations

from torch import nn

from legolm.core.config import ModelConfig


def make_norm(config: ModelConfig) -> nn.Module:
    """LayerNorm (GPT-2, Pythia) or RMSNorm (Llama) of width n_embd, as the config says."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps)

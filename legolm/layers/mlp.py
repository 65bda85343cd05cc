"""Feed-forward parts."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from legolm.core.config import ModelConfig


class GeluMLP(nn.Module):
    """fc -> GELU -> proj (GPT-2 uses the tanh approximation, Pythia the exact erf)."""

    def __init__(self, fc: nn.Module, proj: nn.Module, approximate: str = "none") -> None:
        super().__init__()
        self.fc, self.proj, self.approximate = fc, proj, approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate=self.approximate))


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, gate: nn.Module, up: nn.Module, down: nn.Module) -> None:
        super().__init__()
        self.gate, self.up, self.down = gate, up, down

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def gelu_mlp(config: ModelConfig) -> GeluMLP:
    """C -> intermediate -> C with GELU (tanh approximation when activation is ``gelu_tanh``)."""
    C, F_ = config.n_embd, config.intermediate_size
    approximate = "tanh" if config.activation == "gelu_tanh" else "none"
    return GeluMLP(nn.Linear(C, F_, bias=config.mlp_bias), nn.Linear(F_, C, bias=config.mlp_bias), approximate)


def swiglu_mlp(config: ModelConfig) -> SwiGLUMLP:
    """SwiGLU of hidden width ``intermediate_size`` (Llama)."""
    C, F_ = config.n_embd, config.intermediate_size
    return SwiGLUMLP(nn.Linear(C, F_, bias=config.mlp_bias), nn.Linear(C, F_, bias=config.mlp_bias),
                     nn.Linear(F_, C, bias=config.mlp_bias))

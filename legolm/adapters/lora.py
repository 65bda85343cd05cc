"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021, arXiv:2106.09685).

::

    x ──┬── base_layer (W0, frozen) ───────────────────────(+)── y
        └── dropout ── A (r×d_in) ── B (d_out×r) ── ×s ─────┘

    y = W0 x + s · B A dropout(x),   s = alpha / r   (rsLoRA: alpha / √r, Kalajdzievski 2023, arXiv:2312.03732)

A starts like an `nn.Linear` weight (Kaiming-uniform, a=√5, as peft does) and B at zero, so a
fresh adapter changes nothing. Over a bf16/fp16 base the adapter weights are kept in fp32 (peft's
``autocast_adapter_dtype``): small optimizer updates would otherwise round away; under autocast
the matmuls still run in bf16. `merge` folds s·BA into W0 (the forward is then the base layer
alone) and `unmerge` takes it back out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from legolm.adapters.base import AdapterLayer
from legolm.errors import ConfigError


def check_lora_settings(r: int, alpha: float, dropout: float, where: str = "LoRA") -> None:
    """Raise `ConfigError` for a rank, alpha or dropout that LoRA cannot use."""
    if not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{where}: rank r must be a positive integer, got {r!r}; e.g. r=8")
    if not alpha > 0:
        raise ConfigError(f"{where}: alpha must be > 0, got {alpha!r}; e.g. alpha=16 (scaling alpha/r)")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{where}: dropout must be in [0, 1), got {dropout!r}; e.g. dropout=0.05")


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """alpha / r, or alpha / √r for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(AdapterLayer):
    """An `nn.Linear` with a LoRA update.

    Args:
        base_layer: The frozen linear layer W0 (out_features × in_features).
        r: Rank of the update.
        alpha: Scale numerator; the update is multiplied by alpha/r (alpha/√r with rsLoRA).
        dropout: Dropout probability on the adapter's input (0 = none).
        use_rslora: Scale by alpha/√r (rank-stabilised LoRA).
        dtype: Adapter weight dtype (None: the base weight's, fp32 for a half-precision base).
    """

    base_layer: nn.Linear

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype | None = None) -> None:
        check_lora_settings(r, alpha, dropout)
        super().__init__(base_layer)
        w = base_layer.weight
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        if dtype is None:
            dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, device=w.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base_layer.out_features, r, device=w.device, dtype=dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def reset_lora_parameters(self) -> None:
        """A ~ Kaiming-uniform(a=√5) (bound 1/√d_in, `nn.Linear`'s default), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def adapter_parameters(self) -> Iterator[nn.Parameter]:
        yield self.lora_A
        yield self.lora_B

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (..., d_out)
        if self.merged:
            return y
        h = F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return y + (F.linear(h, self.lora_B) * self.scaling).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """s·B A (d_out × d_in), computed in at least fp32, in the base weight's dtype."""
        dtype = torch.promote_types(self.lora_B.dtype, torch.float32)
        delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling
        return delta.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self.base_layer.weight += self.delta_weight()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base_layer.weight -= self.delta_weight()
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"

"""Skip2-LoRA: low-rank adapters from chosen block outputs straight to the LM head.

Matsutani et al., "Skip2-LoRA: A Lightweight On-device DNN Fine-tuning Method for Low-cost Edge
Devices", ASP-DAC 2025, arXiv:2410.21073, in the transformer form LitGPT-style integrations use::

    idx ─ embed ─ block 0 ─ h₀ ─ … ─ block i ─ hᵢ ─ … ─ block L-1 ─ h_L-1 ─ norm ─(+)─ lm_head ─ logits
                                           │                                  ▲
                                           └── Sᵢ(hᵢ) = s·Bᵢ Aᵢ dropout(hᵢ) ───┘   (one per chosen block)
          └──────────────── frozen, run without autograd ────────────────┘        └─ trainable ─┘

    x = norm(h_L-1) + Σᵢ Sᵢ(hᵢ),   logits = lm_head(x)   (lm_head optionally with its own LoRA)

With ``tap_norm="final"`` each adapter reads norm(hᵢ) instead, through the same frozen final norm.
Raw residual streams of pretrained Llama-family models carry massive activations (Sun et al. 2024,
arXiv:2402.17762): SmolLM2-135M's block outputs reach |h| ≈ 2·10⁴ where the final norm's output
stays near 50, and adapters on raw hᵢ diverge at ordinary learning rates (measured:
docs/results/skip2lora.md, "Where Skip2-LoRA loses: a real pretrained base").

The backbone runs under ``torch.no_grad``: backward touches only the adapters, the optional head
LoRA and the head's input gradient, never a block. Because the frozen backbone is deterministic,
its outputs for a training window (the ``features``: every hᵢ and norm(h_L-1)) are the same in
every epoch, which is what `legolm.adapters.skip_cache.SkipCache` exploits. Evaluation and
training run the same `forward` (``features`` then ``head``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from legolm.adapters.base import adapter_parameters
from legolm.adapters.inject import LM_HEAD, LoRAConfig, inject_lora
from legolm.adapters.lora import check_lora_settings, lora_scaling
from legolm.errors import CheckpointError, ConfigError, LegolmError
from legolm.model.transformer import TransformerLM
from legolm.utils.io import atomic_dir, read_json
from legolm.utils.params import count_parameters

CONFIG_FILE, WEIGHTS_FILE = "skip2lora_config.json", "skip2lora_model.safetensors"
TAP_NORMS = ("none", "final")
HeadGrad = Literal["auto", "low-rank", "chain"]  # how the adapters' gradients pass the head (`Skip2LoRALoss`)
HEAD_GRADS: tuple[HeadGrad, ...] = ("auto", "low-rank", "chain")
AUTO_LOW_RANK_RATIO = 4  # head_grad auto: the low-rank way where this times R = K·r <= n_embd


@dataclass
class Skip2LoRAConfig:
    """Which blocks feed the head, and the adapters' size.

    Attributes:
        block_indices: Blocks whose outputs get an adapter to the head (0-based, bottom to top).
        r: Rank of every adapter.
        alpha: Scale numerator: adapter outputs are multiplied by alpha/r.
        dropout: Dropout on each adapter's input, in [0, 1).
        lora_head: Also put an ordinary LoRA (same r/alpha) on the LM head.
        tap_norm: What an adapter reads: ``none``, the block output hᵢ as in the paper; ``final``,
            the frozen final norm of hᵢ (bases with massive activations, e.g. Llama/SmolLM2).
    """

    block_indices: list[int]
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    lora_head: bool = False
    tap_norm: Literal["none", "final"] = "none"

    def validate(self, n_layer: int, width: int) -> None:
        """Raise `ConfigError` for indices a model of ``n_layer`` blocks cannot use, or bad sizes (``width``:
        n_embd, the larger bound of an adapter's rank)."""
        check_lora_settings(self.r, self.alpha, self.dropout, where="Skip2-LoRA")
        if self.r > width:  # n_embd -> r -> n_embd: a larger rank adds nothing (and a huge one would not fit)
            raise ConfigError(f"Skip2-LoRA rank r={self.r:,} exceeds the model width {width} (each adapter maps "
                              f"n_embd -> r -> n_embd); use r <= {width}")
        if self.tap_norm not in TAP_NORMS:
            raise ConfigError(f"Skip2-LoRA tap_norm must be one of {', '.join(TAP_NORMS)}, got {self.tap_norm!r}")
        if not self.block_indices:
            raise ConfigError(f"Skip2-LoRA needs at least one block index; e.g. --skip2lora.block-indices "
                              f"{' '.join(str(i) for i in range(max(0, n_layer - 3), n_layer))}")
        bad = [i for i in self.block_indices if not 0 <= i < n_layer]
        if bad:
            raise ConfigError(f"Skip2-LoRA block indices {bad} are out of range for a model of {n_layer} blocks "
                              f"(valid: 0..{n_layer - 1})")
        dup = sorted({i for i in self.block_indices if self.block_indices.count(i) > 1})
        if dup:
            raise ConfigError(f"Skip2-LoRA block indices {dup} are listed more than once; give each block once")


class SkipAdapter(nn.Module):
    """Sᵢ(h) = s · B A h: n_embd -> r -> n_embd, A Kaiming-uniform (as LoRA), B zero.

    `Skip2LoRAModel.head_input` runs all adapters at once (and applies the input dropout); ``forward``
    is one adapter alone.

    Args:
        width: n_embd.
        r: Rank.
        alpha: Scale numerator (s = alpha / r).
    """

    def __init__(self, width: int, r: int, alpha: float) -> None:
        super().__init__()
        self.scaling = lora_scaling(r, alpha, use_rslora=False)
        self.lora_A = nn.Parameter(torch.empty(r, width))
        self.lora_B = nn.Parameter(torch.zeros(width, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, h: Tensor) -> Tensor:
        z = F.linear(h.to(self.lora_A.dtype), self.lora_A)  # (B, T, r)
        return F.linear(z, self.lora_B) * self.scaling  # (B, T, C)


class Skip2LoRAModel(nn.Module):
    """A frozen `TransformerLM` plus Skip2-LoRA adapters; ``model(idx)`` returns logits (B, T, V).

    Args:
        base: The pretrained model (frozen here, in place).
        config: Block indices and adapter sizes.
    """

    def __init__(self, base: TransformerLM, config: Skip2LoRAConfig) -> None:
        config.validate(base.config.n_layer, base.config.n_embd)
        super().__init__()
        self.base, self.skip_config = base, config
        self.config = base.config  # what generic evaluation code reads (vocab, context)
        base.requires_grad_(False)
        param = next(base.parameters())
        adapters = {str(i): SkipAdapter(base.config.n_embd, config.r, config.alpha) for i in config.block_indices}
        self.adapters = nn.ModuleDict(adapters).to(param.device)
        self.tap_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.lora_head:
            inject_lora(base, LoRAConfig(r=config.r, alpha=config.alpha, dropout=config.dropout,
                                         target_modules=[LM_HEAD]))

    @property
    def indices(self) -> list[int]:
        return self.skip_config.block_indices

    def train(self, mode: bool = True) -> Skip2LoRAModel:
        """Adapters follow ``mode``; the backbone stays in eval mode (deterministic features)."""
        super().train(mode)
        self.base.eval()
        self.base.lm_head.train(mode)
        return self

    def trainable(self) -> Iterator[nn.Parameter]:
        """The skip adapters' parameters, then the head LoRA's."""
        yield from self.adapters.parameters()
        yield from adapter_parameters(self.base)

    @torch.no_grad()
    def features(self, idx: Tensor) -> Tensor:
        """The frozen backbone's outputs the head reads: (B, K+1, T, C) = [tap(h_i) for chosen i] + [norm(h_L-1)]."""
        B, T = idx.shape
        positions = torch.arange(T, device=idx.device).expand(B, T)
        h = self.base.embed(idx, positions)
        out = self.base.forward_layers(h, self.base.make_context(positions, h.dtype, span=T), capture=self.indices)
        tap = self.base.norm if self.skip_config.tap_norm == "final" else (lambda x: x)
        taps = [tap(out.captured[i]) for i in self.indices] + [self.base.norm(out.hidden)]
        return torch.stack(taps, dim=1)

    def head_parts(self, feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The head input as h + z bᵀ, from features (B, K+1, T, C): h = norm(h_L-1) (B, T, C), z = the taps'
        A products (B, T, K·r), b = [s₁B₁ … s_KB_K] (C, K·r).

        All K adapters run as two matmuls, not 2K: the A products as one batched matmul over the
        taps, the B products as one GEMM over the concatenated ranks (Σᵢ sᵢBᵢzᵢ = [s₁B₁ … s_KB_K] [z₁; …; z_K]),
        so the tap sum happens inside the GEMM instead of as K full-size additions. Without tap dropout the
        batched matmul runs over all (b, k) pairs of the features, the last slot against a zero A, so that
        (B, K+1) collapse into one batch dimension of the contiguous features and the taps are read in place:
        the slice of the K taps alone does not collapse, and matmul would copy it (K·B·T·C values).
        """
        adapters = [a for a in self.adapters.values() if isinstance(a, SkipAdapter)]
        a = torch.stack([ad.lora_A for ad in adapters])  # (K, r, C)
        b = torch.cat([ad.lora_B * ad.scaling for ad in adapters], dim=1)  # (C, K·r)
        k = len(adapters)
        dropped = isinstance(self.tap_dropout, nn.Dropout) and self.training
        taps = self.tap_dropout(feats[:, :k]) if dropped else feats  # (B, K, T, C), or all K+1 slots in place
        if not dropped:
            a = torch.cat([a, a.new_zeros(1, *a.shape[1:])])  # (K+1, r, C): the head-input slot's A is 0
        if not torch.is_autocast_enabled(taps.device.type):  # autocast casts both factors itself
            taps = taps.to(a.dtype)
        z = torch.matmul(taps, a.transpose(1, 2))[:, :k]  # (B, K, T, r)
        return feats[:, -1], z.permute(0, 2, 1, 3).flatten(2), b  # (B, T, K·r)

    def head_input(self, feats: Tensor) -> Tensor:
        """What the head reads, from features (B, K+1, T, C): norm(h_L-1) + Σᵢ Sᵢ(dropout(hᵢ)), (B, T, C)."""
        h, z, b = self.head_parts(feats)
        x = h.to(torch.promote_types(h.dtype, torch.float32)) + F.linear(z, b)  # (B, T, C), at least fp32
        return x.to(self.base.wte.weight.dtype)  # the head's weight dtype (autocast may lower it)

    @property
    def rank(self) -> int:
        """R = K·r: the adapters' ranks together, the dimension of what they add to the head input."""
        return len(self.indices) * self.skip_config.r

    def frozen_linear_head(self) -> bool:
        """Whether the head is a frozen bias-free linear map (no head LoRA), the case of
        `legolm.train.low_rank_head`: the adapters' gradients can go through it at their rank."""
        head = self.base.lm_head
        return isinstance(head, nn.Linear) and head.bias is None and not head.weight.requires_grad

    def head(self, feats: Tensor) -> Tensor:
        """Logits from features (B, K+1, T, C): lm_head(norm(h_L-1) + Σᵢ Sᵢ(hᵢ))."""
        return self.base.lm_head(self.head_input(feats))

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(self.features(idx))

    def report(self) -> str:
        """Every adapter with its shapes, and the trainable total."""
        lines = [f"Skip2-LoRA: blocks {self.indices} -> head, r={self.skip_config.r}, "
                 f"alpha={self.skip_config.alpha} (scaling {self.skip_config.alpha / self.skip_config.r:g})"]
        for i, adapter in self.adapters.items():
            assert isinstance(adapter, SkipAdapter)
            n = adapter.lora_A.numel() + adapter.lora_B.numel()
            lines.append(f"  block {i:>3}: A {tuple(adapter.lora_A.shape)}, B {tuple(adapter.lora_B.shape)}: {n:,}")
        head = sum(p.numel() for p in adapter_parameters(self.base))
        if head:
            lines.append(f"  lm_head LoRA: {head:,}")
        trainable, total = count_parameters(self)  # the numbers `fit` reports (the head LoRA is in the base)
        lines.append(f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
        return "\n".join(lines)


def save_skip2lora(model: Skip2LoRAModel, directory: str | Path, overwrite: bool = False) -> Path:
    """Write the adapters (safetensors) and their config + the base model's shape (JSON), atomically."""
    state = {f"adapters.{k}": v.detach().contiguous() for k, v in model.adapters.state_dict().items()}
    head = {id(p) for p in adapter_parameters(model.base)}
    state |= {f"base.{n}": p.detach().contiguous() for n, p in model.base.named_parameters() if id(p) in head}
    meta = {"skip2lora": asdict(model.skip_config), "n_layer": model.base.config.n_layer,
            "n_embd": model.base.config.n_embd, "vocab_size": model.base.config.vocab_size,
            "base_name": model.base.config.name}
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(directory)


def load_skip2lora(base: TransformerLM, directory: str | Path) -> Skip2LoRAModel:
    """Rebuild a `Skip2LoRAModel` on ``base`` from `save_skip2lora` output; refuse another model's adapters."""
    d = Path(directory)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{d} is not a Skip2-LoRA adapter: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        meta = read_json(d / CONFIG_FILE)
    except LegolmError as err:
        raise CheckpointError(str(err)) from None
    missing = [k for k in ("n_layer", "n_embd", "vocab_size", "skip2lora") if k not in meta]
    if missing or not isinstance(meta["skip2lora"], dict):
        raise CheckpointError(f"{d / CONFIG_FILE} lacks {missing or ['a skip2lora mapping']}; it is not a Skip2-LoRA "
                              "adapter config")
    for key in ("n_layer", "n_embd", "vocab_size"):
        if meta[key] != getattr(base.config, key):
            raise CheckpointError(f"Skip2-LoRA adapter in {d} was made for a model with {key}={meta[key]}, "
                                  f"this one has {getattr(base.config, key)}; load it onto the model it was trained on")
    try:
        config = Skip2LoRAConfig(**meta["skip2lora"])
    except TypeError as err:  # a key this version does not know, or one missing
        raise CheckpointError(f"{d / CONFIG_FILE} is not a Skip2-LoRA adapter config ({err})") from None
    model = Skip2LoRAModel(base, config)
    state = load_file(str(d / WEIGHTS_FILE))
    adapters = {k.removeprefix("adapters."): v for k, v in state.items() if k.startswith("adapters.")}
    model.adapters.load_state_dict(adapters)
    params = dict(model.base.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            if k.startswith("base."):
                params[k.removeprefix("base.")].copy_(v)
    return model

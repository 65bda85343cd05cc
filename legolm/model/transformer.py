"""`TransformerLM`: token embedding -> list of layers -> final norm -> LM head.

::

    idx (B, T) ─ wte (+ wpe) ─ h₀ ─ blocks[0] ─ h₁ ─ … ─ blocks[L-1] ─ h_L ─ norm ─ lm_head ─ logits
                               └──────────── forward(start, end) runs any slice ────────────┘

`forward` can start from hidden states and stop before the top (LEGO's split models,
Skip2-LoRA's taps); `forward_layers` returns the hidden states of chosen layers too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import torch
from torch import Tensor, nn

from legolm.core.config import ModelConfig
from legolm.core.context import LayerContext, attention_bias
from legolm.core.kv_cache import KVCache
from legolm.core.rope import rope_operands, rope_tables
from legolm.errors import ConfigError
from legolm.layers import LayerSpec, build_blocks, stack_config
from legolm.layers.norms import make_norm
from legolm.model.validate import check_state_dict
from legolm.utils.device import memory_bytes

ROPE_MIN_ROWS = 64  # the smallest RoPE table built (it grows in powers of two)


def check_fits_memory(config: ModelConfig) -> None:
    """Raise `ConfigError` when the weights of a model of ``config`` alone exceed the memory of the device
    models are built on (counted on the meta device: nothing is allocated)."""
    device = torch.get_default_device()
    available = memory_bytes(device)
    with torch.device("meta"):
        n = TransformerLM(config).num_parameters()
    need = n * torch.get_default_dtype().itemsize
    if available is not None and need > available:
        raise ConfigError(f"model config: {n:,} parameters need {need / 1e9:,.1f} GB as "
                          f"{str(torch.get_default_dtype())[6:]}, more than the {available / 1e9:,.1f} GB of "
                          f"memory of {'this machine' if device.type == 'cpu' else device}; choose smaller sizes "
                          f"(vocab_size x n_embd is "
                          f"{config.vocab_size * config.n_embd:,} alone)")


@dataclass
class LayersOutput:
    """Result of `TransformerLM.forward_layers`: the last hidden state and the captured ones."""

    hidden: Tensor
    captured: dict[int, Tensor] = field(default_factory=dict)


def init_weights(module: nn.Module, n_layer: int) -> None:
    """GPT-2 initialisation of ``module``'s weights in a model of ``n_layer`` layers.

    N(0, 0.02), residual output projections (``.proj``, ``.down``) scaled by 1/√(2·n_layer), zero
    biases, norms reset. Used for whole models and for the layers `LegoLM.extend` appends.
    """
    std = 0.02
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            scaled = name.endswith((".proj", ".down")) or name in ("proj", "down")
            nn.init.normal_(sub.weight, 0.0, std / math.sqrt(2 * n_layer) if scaled else std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, 0.0, std)
        elif isinstance(sub, (nn.LayerNorm, nn.RMSNorm)):
            sub.reset_parameters()


class TransformerLM(nn.Module):
    """A decoder-only language model assembled from registered layer types, or from layer objects.

    Args:
        config: Sizes and the per-layer types; see `ModelConfig`.
        layers: Instead of ``config.layers``: names, builders or module instances (`legolm.layers`).
    """

    def __init__(self, config: ModelConfig, layers: Sequence[LayerSpec] | None = None) -> None:
        if layers is None and torch.get_default_device().type != "meta":
            check_fits_memory(config)  # before the first weight is allocated
        super().__init__()
        self.config = config = stack_config(config, layers)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.positions == "learned" else None
        self.blocks = nn.ModuleList(build_blocks(config, layers))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.rope: Tensor
        self.register_buffer("rope", self._rope_tables(0), persistent=False)  # (2, rows, R) cos/sin, grown on use
        self._retired_rope: list[Tensor] = []
        self.reset_parameters()

    # -- construction --------------------------------------------------------------------------
    def _rope_tables(self, rows: int, device: torch.device | None = None) -> Tensor:
        c = self.config
        return rope_tables(c.rotary_dim, rows, c.rope_base, device) if c.rotary_dim else torch.empty(0)

    def reserve_positions(self, n: int) -> None:
        """Make the RoPE tables cover positions 0..n-1 (at most the context, ``block_size``).

        The tables are sized by what the model is run on, not by the config's context (a 2**20-position
        config would otherwise build 1 GiB of tables for a 128-token run): they grow on demand to the
        next power of two. A table that is replaced stays alive, because CUDA graphs captured with it
        keep reading its memory (its rows are the same as the new table's first rows).
        """
        c = self.config
        if not c.rotary_dim or self.rope.shape[1] >= min(n, c.block_size):
            return
        rows = min(c.block_size, max(ROPE_MIN_ROWS, 1 << (n - 1).bit_length()))
        self._retired_rope.append(self.rope)
        self.rope = self._rope_tables(rows, self.rope.device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> TransformerLM:
        """`.to()`, `.bfloat16()`, ... move the RoPE tables but keep them fp32, as Hugging Face computes
        them: they are cast to the activations' dtype at use, and a model cast to bf16 and back stays
        equal to one built in fp32 (bf16 tables cost 3e-3 of the logits of the real SmolLM2-135M)."""
        rope = self.rope
        super()._apply(fn, recurse)
        self.rope = rope.to(self.rope.device)
        return self

    def reset_parameters(self) -> None:
        """GPT-2 initialisation of every weight (see `init_weights`)."""
        init_weights(self, self.config.n_layer)

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: dict[str, Tensor], *, strict: bool = True,
                        **kwargs: Any) -> Self:
        """Build without random init (on the meta device) and take the tensors of ``state``.

        ``kwargs`` go to the constructor of a subclass (`LegoLM`'s meta).
        """
        with torch.device("meta"):
            model = cls(config, **kwargs)
        check_state_dict(model, state)
        if config.tie_embeddings:
            state = {**state, "lm_head.weight": state["wte.weight"]}
        model.load_state_dict(state, strict=strict, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.wte.weight
        model.rope = model._rope_tables(0, next(iter(state.values())).device)  # where the weights are
        return model

    def num_parameters(self, trainable_only: bool = False) -> int:
        params = {id(p): p for p in self.parameters() if p.requires_grad or not trainable_only}
        return sum(p.numel() for p in params.values())

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        *,
        start: int = 0,
        end: int | None = None,
        cache: KVCache | None = None,
        input_pos: Tensor | None = None,
        positions: Tensor | None = None,
        pad_mask: Tensor | None = None,
        logits: bool = True,
    ) -> Tensor:
        """Run layers ``start:end``.

        Args:
            x: Token ids (B, T) when ``start == 0``, else hidden states (B, T, C).
            start: First layer to run.
            end: One past the last layer (default: all); logits are returned only when it is the top.
            cache: KV cache to read and write; needs ``input_pos``.
            input_pos: Cache slots (T,) of these tokens.
            positions: Position ids (B, T) for RoPE / learned embeddings; default = slots or 0..T-1.
            pad_mask: (B, S) True where a key slot holds a real token (left-padded batches).
            logits: At the top layer, apply the LM head (else return the final norm's output (B, T, C),
                what the head reads: chunked losses apply the head themselves).

        Returns:
            Logits (B, T, vocab) if ``end`` is the top layer, else hidden states (B, T, C).
        """
        end = self.config.n_layer if end is None else end
        B, T = x.shape[0], x.shape[1]
        span = T if positions is None and input_pos is None else None  # positions 0..T-1
        if positions is None:
            positions = (input_pos if input_pos is not None else torch.arange(T, device=x.device)).expand(B, T)
        h = self.embed(x, positions) if start == 0 else x
        ctx = self.make_context(positions, h.dtype, cache, input_pos, pad_mask, span=span)
        h = self.forward_layers(h, ctx, start, end, cache).hidden
        if end != self.config.n_layer:
            return h
        return self.project(h) if logits else self.norm(h)

    def embed(self, idx: Tensor, positions: Tensor) -> Tensor:
        """Token (+ learned position) embeddings: (B, T) -> (B, T, C)."""
        h = self.wte(idx)
        return h + self.wpe(positions) if self.wpe is not None else h

    def make_context(self, positions: Tensor, dtype: torch.dtype, cache: KVCache | None = None,
                     input_pos: Tensor | None = None, pad_mask: Tensor | None = None,
                     span: int | None = None) -> LayerContext:
        """RoPE tables for ``positions`` (B, T) and the attention mask, shared by all layers.

        ``span``: every position is below it (known without reading ``positions``, which would sync a
        GPU); default: the cache's length, else the model's context. The RoPE tables grow to cover it.
        """
        cos = sin = None
        if self.config.rotary_dim:
            self.reserve_positions(span or (cache.max_len if cache is not None else self.config.block_size))
            cos, sin = rope_operands(self.rope[:, positions].to(dtype))  # (B, T, R) each
            cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, R): heads rotate before they move to dim 1
        bias = None
        if cache is not None or pad_mask is not None:
            T = positions.shape[1]
            slots = input_pos if input_pos is not None else torch.arange(T, device=positions.device)
            S = cache.max_len if cache is not None else T
            keys = torch.arange(S, device=positions.device)
            allowed = (keys[None, :] <= slots[:, None])[None, None]  # (1, 1, T, S) causal over slots
            if pad_mask is not None:  # pad keys are hidden; a query always sees itself (no empty rows)
                allowed = allowed & pad_mask[:, None, None, :] | (keys[None, :] == slots[:, None])[None, None]
            bias = attention_bias(allowed, dtype)
        return LayerContext(cos, sin, bias, input_pos)

    def forward_layers(self, h: Tensor, ctx: LayerContext, start: int = 0, end: int | None = None,
                       cache: KVCache | None = None, capture: Sequence[int] = ()) -> LayersOutput:
        """Run blocks ``start:end`` on hidden states, keeping the outputs of the blocks in ``capture``."""
        end = self.config.n_layer if end is None else end
        captured: dict[int, Tensor] = {}
        for i in range(start, end):
            h = self.blocks[i](h, ctx, cache.get(i) if cache is not None else None)  # (B, T, C)
            if i in capture:
                captured[i] = h
        return LayersOutput(h, captured)

    def project(self, h: Tensor) -> Tensor:
        """Final norm and LM head: (B, T, C) -> (B, T, vocab)."""
        return self.lm_head(self.norm(h))


def check_shapes(config: ModelConfig, state: dict[str, Tensor], source: str) -> None:
    """`check_state_dict` against a model of ``config`` built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = TransformerLM(config)
    check_state_dict(model, state, source)

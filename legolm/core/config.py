"""`ModelConfig`: the one serializable description of a `TransformerLM`, with named presets."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from legolm.core.layer_types import CUSTOM_PREFIX, registered_layers
from legolm.errors import ConfigError

Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "gelu_tanh", "silu"]
Positions = Literal["learned", "rope"]

# Sanity bounds, checked before any weight is allocated (a typo or a hostile config must not ask for terabytes).
MAX_LAYERS = 1024
MAX_BLOCK_SIZE = 1 << 20  # positions: RoPE tables and learned embeddings are sized by this
MAX_VOCAB = 1 << 24
MAX_WIDTH = 1 << 16  # n_embd, intermediate_size, head_dim
MAX_HEADS = 1 << 12


@dataclass
class ModelConfig:
    """Sizes and parts of a decoder-only transformer.

    The layer list names a registered layer type per block (``layers: ["pythia"] * 6``); each
    type's builder reads the sizes below and picks its parts (norm, attention, MLP, residual
    wiring). Everything a checkpoint needs to be rebuilt is here, and nothing else.

    Attributes:
        layers: Registered layer type of each block, bottom to top (``custom:<Class>``: a layer object given to
            ``TransformerLM(config, layers=[...])``, which this config describes but cannot rebuild).
        vocab_size: Rows of the token embedding and of the LM head.
        n_embd: Model width C.
        n_head: Query heads.
        n_kv_head: Key/value heads (< n_head means grouped-query attention); None = n_head.
        head_dim: Width of one head; None = n_embd // n_head.
        intermediate_size: Hidden width of the MLP.
        block_size: Longest sequence the positions support.
        norm: Normalisation used in the blocks and before the head.
        norm_eps: Epsilon of every norm.
        activation: MLP non-linearity (``silu`` means a SwiGLU MLP in Llama blocks).
        attn_bias: Biases on the q/k/v and output projections.
        mlp_bias: Biases on the MLP projections.
        positions: ``learned`` absolute embeddings (GPT-2) or rotary embeddings.
        rotary_pct: Fraction of each head's dims that rotate (Pythia 0.25, Llama 1.0).
        rope_base: RoPE theta.
        tie_embeddings: The LM head shares the token embedding's weight.
        bos_token_id: Beginning-of-sequence id, if the tokenizer has one.
        eos_token_id: End-of-sequence id used to stop generation.
        name: Preset or checkpoint name, for reports.
    """

    layers: list[str]
    vocab_size: int
    n_embd: int
    n_head: int
    intermediate_size: int
    block_size: int
    n_kv_head: int | None = None
    head_dim: int | None = None
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    activation: Activation = "gelu"
    attn_bias: bool = True
    mlp_bias: bool = True
    positions: Positions = "rope"
    rotary_pct: float = 1.0
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):  # layer objects get their own message (the generic one would print them)
            self._check_layers()
        self.check_types()
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_head > 0 and self.n_embd % self.n_head:
                raise ConfigError(f"model config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                                  "choose sizes whose quotient is the head width (or give head_dim)")
            self.head_dim = self.n_embd // max(self.n_head, 1)
        self.validate()

    def check_types(self) -> None:
        """Raise `ConfigError` naming the first field whose value is not of its type (or not one of its choices)."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _is_instance(value, hints[f.name]):
                raise ConfigError(f"model config: {f.name} must be {_describe(hints[f.name])}, got {value!r}")

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def kv_heads(self) -> int:
        assert self.n_kv_head is not None
        return self.n_kv_head

    @property
    def hd(self) -> int:
        assert self.head_dim is not None
        return self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (even), 0 for learned positions."""
        if self.positions != "rope":
            return 0
        return int(self.hd * self.rotary_pct) // 2 * 2

    def validate(self) -> None:
        """Raise `ConfigError` naming the first inconsistent field."""
        bounds = {"vocab_size": MAX_VOCAB, "n_embd": MAX_WIDTH, "n_head": MAX_HEADS, "intermediate_size": MAX_WIDTH,
                  "block_size": MAX_BLOCK_SIZE, "n_kv_head": MAX_HEADS, "head_dim": MAX_WIDTH}
        for name, limit in bounds.items():
            if not 0 < getattr(self, name) <= limit:
                raise ConfigError(f"model config: {name} must be in [1, {limit:,}], got {getattr(self, name)}")
        if len(self.layers) > MAX_LAYERS:
            raise ConfigError(f"model config: {len(self.layers):,} layers exceed the limit of {MAX_LAYERS:,}")
        for name in ("norm_eps", "rope_base"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"model config: {name} must be > 0 and finite, got {getattr(self, name)}")
        for name in ("bos_token_id", "eos_token_id"):
            token = getattr(self, name)
            if token is not None and token < 0:
                raise ConfigError(f"model config: {name} must be a token id >= 0 (or null), got {token}")
        self._check_layers()
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"model config: n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}"
            )
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ConfigError(f"model config: rotary_pct must be in [0, 1], got {self.rotary_pct}")

    def _check_layers(self) -> None:
        if not self.layers:
            raise ConfigError("model config: `layers` is empty; give at least one layer type, e.g. ['pythia']")
        objects = [type(n).__name__ for n in self.layers if not isinstance(n, str)]
        if objects:
            raise ConfigError(f"model config: `layers` holds type names, not {objects[0]} objects; pass layer objects "
                              "to TransformerLM(config, layers=[...])")
        custom = {n for n in self.layers if n.startswith(CUSTOM_PREFIX) and n != CUSTOM_PREFIX}
        unknown = sorted(set(self.layers) - set(registered_layers()) - custom)
        if unknown:
            raise ConfigError(f"model config: unknown layer type(s) {unknown}; known: {registered_layers()}")

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"model config: unknown field(s) {unknown}; valid fields: {sorted(names)}")
        try:
            return cls(**data)
        except TypeError as err:
            raise ConfigError(f"model config: {err}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """Build a named preset (see `PRESETS`), optionally overriding fields."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], "name": name, **overrides})


def _is_instance(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (ints are floats too; bools are not numbers)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, arg) for arg in get_args(tp))
    if origin is Literal:
        return value in get_args(tp)
    if origin is list:
        return isinstance(value, list) and all(_is_instance(v, get_args(tp)[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0])}"
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


_TYPE_NAMES = {type(None): "null", int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _gpt2(n_layer: int, n_embd: int, n_head: int, vocab: int = 50257, block: int = 1024) -> dict[str, Any]:
    return dict(
        layers=["gpt2"] * n_layer, vocab_size=vocab, n_embd=n_embd, n_head=n_head,
        intermediate_size=4 * n_embd, block_size=block, norm="layernorm", activation="gelu_tanh",
        positions="learned", tie_embeddings=True, eos_token_id=50256, bos_token_id=50256,
    )


def _pythia(n_layer: int, n_embd: int, n_head: int, vocab: int = 50304, block: int = 2048) -> dict[str, Any]:
    return dict(
        layers=["pythia"] * n_layer, vocab_size=vocab, n_embd=n_embd, n_head=n_head,
        intermediate_size=4 * n_embd, block_size=block, norm="layernorm", activation="gelu",
        positions="rope", rotary_pct=0.25, rope_base=10000.0, tie_embeddings=False,
        eos_token_id=0, bos_token_id=0,
    )


def _llama(n_layer: int, n_embd: int, n_head: int, n_kv: int, inter: int, vocab: int, block: int,
           rope_base: float) -> dict[str, Any]:
    return dict(
        layers=["llama"] * n_layer, vocab_size=vocab, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv,
        intermediate_size=inter, block_size=block, norm="rmsnorm", activation="silu", attn_bias=False,
        mlp_bias=False, positions="rope", rotary_pct=1.0, rope_base=rope_base, tie_embeddings=True,
    )


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": _gpt2(12, 768, 12),
    "gpt2-medium": _gpt2(24, 1024, 16),
    "pythia-14m": _pythia(6, 128, 4),
    "pythia-70m": _pythia(6, 512, 8),
    "pythia-160m": _pythia(12, 768, 12),
    "pythia-410m": _pythia(24, 1024, 16),
    "smollm2-135m": {
        **_llama(30, 576, 9, 3, 1536, 49152, 8192, 100000.0), "bos_token_id": 1, "eos_token_id": 2,
    },
    # TinyLlama-1.1B (Zhang et al. 2024, "TinyLlama: An Open-Source Small Language Model", arXiv:2401.02385; the
    # config.json of TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T): Llama 2's architecture and 32,000-token
    # tokenizer at 22 layers x 2048, 32 query / 4 key-value heads, SwiGLU 5632, RMSNorm 1e-5, RoPE theta 10,000,
    # 2,048 positions, an untied head: 1,100,048,384 parameters. The 1B-class model of the scale-out benchmarks.
    "tinyllama-1.1b": {
        **_llama(22, 2048, 32, 4, 5632, 32000, 2048, 10000.0), "tie_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2,
    },
    # Tiny configs for tests and CPU smoke runs.
    "tiny-gpt2": _gpt2(2, 64, 4, vocab=512, block=128),
    "tiny-pythia": _pythia(2, 64, 4, vocab=512, block=128),
    "tiny-llama": _llama(2, 64, 4, 2, 128, 512, 128, 10000.0),
}

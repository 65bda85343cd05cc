"""Compressive memory shared by the memory layers (`infini`, `multi_memory`, `hierarchical`).

Infini-attention (Munkhdalai et al. 2024, "Leave No Context Behind", arXiv 2404.07143) cuts the
sequence into segments of ``segment_len`` tokens. Each segment attends causally to itself
(softmax, no positions) and reads a fixed-size memory written by all earlier segments through
linear attention with σ = ELU + 1. Per memory head, the memory is a matrix M (Dk, Dv) and a
normaliser z (Dk,), kept in fp32::

    read     A_mem = σ(Q) M / (σ(Q) z)                                   (L, Dv)
    write    M ← M + σ(K)ᵀ V                                 (linear rule)
             M ← M + σ(K)ᵀ (V − σ(K) M / (σ(K) z))           (delta rule: store only what is new)
             z ← z + Σ_t σ(K_t)
    output   A = sigmoid(β) · A_mem + (1 − sigmoid(β)) · A_dot           (β learned per head, starts at 0)

One segment of one layer (`MemoryAttention`)::

    x_s ─┬─ qkv ───── q k v ─ causal softmax within the segment ── A_dot ─┐
         │                                                               gate β ─ proj ─ out_s
         └─ mem_qkv ─ mq mk mv ─ read(state) ──────────────────── A_mem ─┘
                                  └─ write(state) ─▶ state for segment s+1

The memory heads are separate projections of width ``n_head · head_dim`` (one head of width
n_embd by default: with 64-wide heads σ(Q)σ(K)ᵀ is nearly constant and nothing is retrieved).
How a layer arranges its memories (banks, several memories, fine and coarse) is a
`CompressiveMemory` passed in. Every state tensor starts at zero; a read of an empty memory is 0.

Memory across calls: a `MemoryLayer` starts each forward from zero memory unless ``carry`` is on;
then it starts from the memory the previous call left (or `set_memory_state`) and keeps the new
one, detached (no gradient flows into an earlier call: the double-backward bug of carrying a
graph). Calls whose lengths are multiples of ``segment_len`` then give exactly the outputs of
one long call. The KV-cached decoder is refused (see `MemoryAttention.forward`).

Incremental decoding (`SegmentCache`): a layer given a `SegmentCache` instead of a KV cache keeps
the memory of the complete segments and the keys/values of the current, partial one; each call
adds its tokens to that segment and writes it into the memory once it holds ``segment_len``
tokens. Token by token this gives the outputs of one long call (up to floating-point rounding),
which is how `legolm.generation.memory_decode` decodes memory models.
"""

from __future__ import annotations

import dataclasses
import math
from abc import abstractmethod
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from legolm.core.config import ModelConfig
from legolm.core.context import LayerContext
from legolm.core.kv_cache import KVStore
from legolm.errors import ConfigError
from legolm.layers.blocks import ParallelBlock

State = dict[str, Tensor]
OptionsT = TypeVar("OptionsT", bound="MemoryOptions")


# -- the math ---------------------------------------------------------------------------------------
def elu_plus_one(x: Tensor) -> Tensor:
    """σ(x) = ELU(x) + 1 > 0: the linear-attention feature map of Infini-attention (Katharopoulos et al. 2020)."""
    return F.elu(x) + 1.0


def memory_read(sq: Tensor, M: Tensor, z: Tensor, eps: float) -> Tensor:
    """A_mem = σ(Q) M / (σ(Q) z): sq (..., L, Dk), M (..., Dk, Dv), z (..., Dk) -> (..., L, Dv).

    The denominator is clamped at ``eps``, so an empty memory (M = 0, z = 0) reads 0.
    """
    return (sq @ M) / (sq @ z.unsqueeze(-1)).clamp_min(eps)


def memory_write(sk: Tensor, v: Tensor, M: Tensor, z: Tensor, delta: bool, eps: float) -> tuple[Tensor, Tensor]:
    """Add one segment: sk (..., L, Dk), v (..., L, Dv) -> new (M, z).

    With ``delta`` only the part of V the memory does not already return for σ(K) is stored.
    """
    if delta:
        v = v - memory_read(sk, M, z, eps)
    return M + sk.transpose(-2, -1) @ v, z + sk.sum(dim=-2)


# -- options ----------------------------------------------------------------------------------------
@dataclass
class MemoryOptions:
    """Options every memory layer has; read from ``config.extra[<layer type>]``.

    Attributes:
        segment_len: Tokens per segment (local attention span; memory is written once per segment).
        use_delta_rule: Write with the delta rule (else the plain linear rule).
        memory_heads: Memory heads; each is n_head·head_dim / memory_heads wide (1 = one head of width n_embd).
        eps: Lower clamp of the read denominator σ(Q) z.
    """

    segment_len: int = 256
    use_delta_rule: bool = True
    memory_heads: int = 1
    eps: float = 1e-6

    @classmethod
    def from_config(cls: type[OptionsT], config: ModelConfig, layer_type: str) -> OptionsT:
        """Parse and check ``config.extra[layer_type]`` (missing = all defaults)."""
        raw = config.extra.get(layer_type, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"model config: extra[{layer_type!r}] must be a mapping of options, got {raw!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ConfigError(f"{layer_type} layer: unknown option(s) {unknown}; valid options: {names}")
        options = cls(**raw)
        options.validate(config, layer_type)
        return options

    def validate(self, config: ModelConfig, layer_type: str) -> None:
        """Raise `ConfigError` naming the first bad option."""
        width = config.n_head * config.hd
        for name in self._positive():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{layer_type} layer: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.use_delta_rule, bool):
            raise ConfigError(f"{layer_type} layer: use_delta_rule must be true or false, got {self.use_delta_rule!r}")
        if width % self.memory_heads:
            raise ConfigError(f"{layer_type} layer: memory_heads={self.memory_heads} must divide "
                              f"n_head*head_dim={width}")
        if not isinstance(self.eps, (int, float)) or isinstance(self.eps, bool) or not self.eps > 0:
            raise ConfigError(f"{layer_type} layer: eps must be > 0, got {self.eps}")

    def _positive(self) -> list[str]:
        return ["segment_len", "memory_heads"]


# -- how memories are arranged -----------------------------------------------------------------------
class CompressiveMemory(nn.Module):
    """One arrangement of memories: what a segment reads, and how it writes.

    The state always holds ``slots`` memories stacked: ``M`` (B, slots, Hm, Dk, Dv) and ``z``
    (B, slots, Hm, Dk) in fp32, ``segment`` () the number of segments written so far, plus any
    extra tensors a subclass adds in `extra_state`.

    Args:
        slots: Memories in the state.
        delta: Use the delta rule.
        eps: Read denominator clamp.
    """

    def __init__(self, slots: int, delta: bool, eps: float) -> None:
        super().__init__()
        self.slots, self.delta, self.eps = slots, delta, eps

    def init_state(self, batch: int, heads: int, dk: int, dv: int, device: torch.device | str) -> State:
        """Empty memories."""
        f32 = torch.float32
        return {"M": torch.zeros(batch, self.slots, heads, dk, dv, dtype=f32, device=device),
                "z": torch.zeros(batch, self.slots, heads, dk, dtype=f32, device=device),
                "segment": torch.zeros((), dtype=torch.long, device=device),
                **self.extra_state(batch, device)}

    def extra_state(self, batch: int, device: torch.device | str) -> State:
        """Tensors beyond M, z, segment (none by default)."""
        return {}

    def read_slots(self, sq: Tensor, state: State) -> Tensor:
        """Read every slot: sq (B, Hm, L, Dk) -> (B, slots, Hm, L, Dv)."""
        return memory_read(sq.unsqueeze(1), state["M"], state["z"], self.eps)

    def write_slot(self, state: State, slot: int, sk: Tensor, v: Tensor) -> State:
        """``state`` with segment (sk, v) (B, Hm, L, ·) written into memory ``slot`` only."""
        M, z = memory_write(sk, v, state["M"][:, slot], state["z"][:, slot], self.delta, self.eps)
        # Rebuilt out of place: the old state may still be needed by autograd.
        return {**state, "M": torch.stack([M if i == slot else state["M"][:, i] for i in range(self.slots)], 1),
                "z": torch.stack([z if i == slot else state["z"][:, i] for i in range(self.slots)], 1)}

    @abstractmethod
    def read(self, q: Tensor, state: State, segment: int) -> Tensor:
        """Memory output for segment ``segment``: raw queries q (B, Hm, L, Dk) -> (B, Hm, L, Dv)."""

    @abstractmethod
    def write(self, k: Tensor, v: Tensor, state: State, segment: int) -> State:
        """State after segment ``segment`` with raw keys k (B, Hm, L, Dk) and values v (B, Hm, L, Dv)."""


# -- incremental decoding ------------------------------------------------------------------------------
@dataclass
class SegmentCache:
    """One memory layer's decoding state for ``B`` sequences at the same position.

    Attributes:
        state: The memory after the complete segments (M, z, segment, ...), as `MemoryLayer` states are.
        segment: Complete segments so far (``state["segment"]`` on the host).
        k: (B, H, L, D) local-attention keys of the current segment (the first ``fill`` are valid).
        v: (B, H, L, D) its values.
        mk: (B, Hm, L, Dm) fp32 memory keys of the current segment, written into the memory when it is full.
        mv: (B, Hm, L, Dm) fp32 memory values.
        fill: Tokens of the current segment seen so far (< L).
    """

    state: State
    segment: int
    k: Tensor
    v: Tensor
    mk: Tensor
    mv: Tensor
    fill: int = 0


# -- the protocol every memory layer implements -----------------------------------------------------
class MemoryLayer(nn.Module):
    """A module that keeps a memory between calls; the model finds these with ``isinstance``.

    ``carry`` off (default): each forward starts from empty memory and keeps nothing. On: each
    forward starts from the stored state (empty after `reset_memory`) and stores its final one.
    """

    carry: bool

    @abstractmethod
    def reset_memory(self) -> None:
        """Forget the stored memory."""

    @abstractmethod
    def get_memory_state(self) -> State:
        """The stored memory (detached; empty dict when nothing is stored)."""

    @abstractmethod
    def set_memory_state(self, state: State) -> None:
        """Store ``state`` (as returned by `get_memory_state`) for the next carrying forward."""

    @abstractmethod
    def empty_memory_state(self, batch: int, device: torch.device | str = "meta") -> State:
        """An empty state for ``batch`` sequences (on ``meta``: shapes and sizes only)."""


def _heads(x: Tensor, n: int) -> Tensor:
    """(B, T, n·d) -> (B, n, T, d)."""
    B, T, W = x.shape
    return x.view(B, T, n, W // n).transpose(1, 2)


class MemoryAttention(MemoryLayer):
    """Segment-local causal softmax attention gated with a compressive memory read (NoPE).

    Args:
        qkv: Local attention projection (B, T, C) -> (B, T, 3·H·D).
        mem_qkv: Memory projection (B, T, C) -> (B, T, 3·H·D), split into ``memory_heads`` heads.
        proj: Output projection (B, T, H·D) -> (B, T, C).
        memory: How the memories are arranged, read and written.
        n_head: Local attention heads H (β is learned per head).
        head_dim: D.
        memory_heads: Hm (Hm·Dm = H·D, so a memory read splits into the H heads of the gate).
        segment_len: Tokens per segment.
        layer_type: Name used in error messages.
    """

    def __init__(self, qkv: nn.Module, mem_qkv: nn.Module, proj: nn.Module, memory: CompressiveMemory,
                 n_head: int, head_dim: int, memory_heads: int, segment_len: int, layer_type: str) -> None:
        super().__init__()
        self.qkv, self.mem_qkv, self.proj, self.memory = qkv, mem_qkv, proj, memory
        self.n_head, self.head_dim, self.memory_heads = n_head, head_dim, memory_heads
        self.segment_len, self.layer_type = segment_len, layer_type
        self.beta = nn.Parameter(torch.zeros(n_head))
        self.carry = False
        self.stored: State | None = None

    # -- MemoryLayer ----------------------------------------------------------------------------------
    def reset_memory(self) -> None:
        self.stored = None

    def get_memory_state(self) -> State:
        return {} if self.stored is None else {k: v.detach().clone() for k, v in self.stored.items()}

    def set_memory_state(self, state: State) -> None:
        device = self.beta.device
        self.stored = {k: v.detach().to(device) for k, v in state.items()} if state else None

    def empty_memory_state(self, batch: int, device: torch.device | str = "meta") -> State:
        dm = self.n_head * self.head_dim // self.memory_heads
        return self.memory.init_state(batch, self.memory_heads, dm, dm, device)

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: Tensor, ctx: LayerContext, cache: KVStore | SegmentCache | None = None) -> Tensor:
        if isinstance(cache, SegmentCache):
            return self.forward_cached(x, cache)
        if cache is not None or ctx.attn_bias is not None:
            raise ConfigError(
                f"the {self.layer_type} memory layer cannot run with a KV cache or a padding mask: its memory is "
                "written per segment, which a KV cache or left padding does not do. Decode it with "
                "legolm.generation.generate (its memory decoder gives the layer a SegmentCache) or score it with "
                "full forward passes model(idx) on unpadded rows"
            )
        B, T, _ = x.shape
        H, D, L = self.n_head, self.head_dim, self.segment_len
        q, k, v = (_heads(t, H) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, T, D) each
        mq, mk, mv = (_heads(t, self.memory_heads) for t in self.mem_qkv(x).chunk(3, dim=-1))  # (B, Hm, T, Dm)
        state = self._start_state(B, x.device)
        first = int(state["segment"])
        gate = torch.sigmoid(self.beta).view(1, H, 1, 1)
        outs = []
        for i, s in enumerate(range(0, T, L)):
            seg = slice(s, s + L)
            local = F.scaled_dot_product_attention(q[:, :, seg], k[:, :, seg], v[:, :, seg], is_causal=True)
            with torch.autocast(x.device.type, enabled=False):  # memory math in fp32 (inf/NaN in half)
                mem = self.memory.read(mq[:, :, seg].float(), state, first + i)  # (B, Hm, l, Dm)
                state = self.memory.write(mk[:, :, seg].float(), mv[:, :, seg].float(), state, first + i)
            state = {**state, "segment": state["segment"] + 1}
            mem = mem.transpose(1, 2).reshape(B, -1, H, D).transpose(1, 2).to(local.dtype)  # (B, H, l, D)
            outs.append(gate * mem + (1 - gate) * local)
        if self.carry:
            self.stored = {name: t.detach() for name, t in state.items()}
        y = torch.cat(outs, dim=2)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))

    # -- incremental decoding (SegmentCache) -----------------------------------------------------------
    def segment_cache(self, batch: int, dtype: torch.dtype, device: torch.device | str,
                      state: State | None = None) -> SegmentCache:
        """An empty decoding state, or one continuing from memory ``state`` (from `get_memory_state`)."""
        start = self.empty_memory_state(batch, device) if not state else {k: v.to(device) for k, v in state.items()}
        H, D, L, Hm = self.n_head, self.head_dim, self.segment_len, self.memory_heads
        dm = H * D // Hm
        return SegmentCache(
            start, int(start["segment"]), torch.zeros(batch, H, L, D, dtype=dtype, device=device),
            torch.zeros(batch, H, L, D, dtype=dtype, device=device),
            torch.zeros(batch, Hm, L, dm, dtype=torch.float32, device=device),
            torch.zeros(batch, Hm, L, dm, dtype=torch.float32, device=device))

    def forward_cached(self, x: Tensor, cache: SegmentCache) -> Tensor:
        """Continue the sequence of ``cache`` by x (B, T, C): the outputs one long call would give."""
        B, T, _ = x.shape
        H, D = self.n_head, self.head_dim
        q, k, v = (_heads(t, H) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, T, D) each
        mq, mk, mv = (_heads(t, self.memory_heads) for t in self.mem_qkv(x).chunk(3, dim=-1))  # (B, Hm, T, Dm)
        gate = torch.sigmoid(self.beta).view(1, H, 1, 1)
        outs, start = [], 0
        while start < T:  # one piece per (part of a) segment
            n = min(self.segment_len - cache.fill, T - start)
            piece = slice(start, start + n)
            local = self._local_cached(q[:, :, piece], k[:, :, piece], v[:, :, piece], cache)
            with torch.autocast(x.device.type, enabled=False):  # memory math in fp32, as in forward
                mem = self.memory.read(mq[:, :, piece].float(), cache.state, cache.segment)  # (B, Hm, n, Dm)
            fill = slice(cache.fill, cache.fill + n)
            cache.mk[:, :, fill], cache.mv[:, :, fill] = mk[:, :, piece].float(), mv[:, :, piece].float()
            cache.fill += n
            if cache.fill == self.segment_len:
                cache.state, cache.segment, cache.fill = self.flushed_state(cache), cache.segment + 1, 0
            mem = mem.transpose(1, 2).reshape(B, -1, H, D).transpose(1, 2).to(local.dtype)  # (B, H, n, D)
            outs.append(gate * mem + (1 - gate) * local)
            start += n
        y = torch.cat(outs, dim=2)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))

    def _local_cached(self, q: Tensor, k: Tensor, v: Tensor, cache: SegmentCache) -> Tensor:
        """Causal softmax attention of n new tokens over the current segment's earlier ones and themselves."""
        f, n = cache.fill, q.shape[2]
        cache.k[:, :, f:f + n], cache.v[:, :, f:f + n] = k, v
        if f == 0:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        keys = torch.arange(f + n, device=q.device)
        mask = keys[None, :] <= (f + torch.arange(n, device=q.device))[:, None]  # (n, f + n)
        return F.scaled_dot_product_attention(q, cache.k[:, :, :f + n], cache.v[:, :, :f + n], attn_mask=mask)

    def flushed_state(self, cache: SegmentCache) -> State:
        """The memory with the current (possibly partial) segment written, as a call ending here leaves it."""
        if cache.fill == 0:
            return cache.state
        with torch.autocast(cache.mk.device.type, enabled=False):
            state = self.memory.write(cache.mk[:, :, :cache.fill], cache.mv[:, :, :cache.fill], cache.state,
                                      cache.segment)
        return {**state, "segment": state["segment"] + 1}

    def _start_state(self, batch: int, device: torch.device) -> State:
        if not self.carry or self.stored is None:
            return self.empty_memory_state(batch, device)
        stored_batch = self.stored["M"].shape[0]
        if stored_batch != batch:
            raise ConfigError(f"the carried {self.layer_type} memory holds {stored_batch} sequence(s) but this call "
                              f"has {batch}; call reset_memory(model) (legolm.layers.memory_state) before streaming "
                              "a new batch")
        return self.stored


class MemoryBlock(ParallelBlock):
    """GPT-NeoX parallel residual around a `MemoryAttention` (`ParallelBlock`'s wiring and parameter names).

    A type of its own: the memory decoder (`legolm.generation.memory_decode`) takes these blocks, the
    fused decoders take plain ones only, and a stack of objects records it as ``custom:MemoryBlock``.
    """

    attn: MemoryAttention

    def __init__(self, norm_1: nn.Module, attn: MemoryAttention, norm_2: nn.Module, mlp: nn.Module) -> None:
        super().__init__(norm_1, attn, norm_2, mlp)


def memory_block(config: ModelConfig, memory: CompressiveMemory, options: MemoryOptions,
                 layer_type: str) -> MemoryBlock:
    """A Pythia-style block whose attention is a `MemoryAttention` over ``memory``."""
    from legolm.layers.mlp import gelu_mlp
    from legolm.layers.norms import make_norm

    C, H, D = config.n_embd, config.n_head, config.hd
    attn = MemoryAttention(
        nn.Linear(C, 3 * H * D, bias=config.attn_bias), nn.Linear(C, 3 * H * D, bias=config.attn_bias),
        nn.Linear(H * D, C, bias=config.attn_bias), memory, H, D, options.memory_heads, options.segment_len,
        layer_type,
    )
    return MemoryBlock(make_norm(config), attn, make_norm(config), gelu_mlp(config))


def written_slots(segment: int, slots: int, segments_per_slot: int) -> int:
    """How many of ``slots`` memories, filled in turn ``segments_per_slot`` segments each, hold data
    before segment ``segment`` is read."""
    return min(slots, math.ceil(segment / segments_per_slot))


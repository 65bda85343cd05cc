"""Decoding models with memory layers (``infini``, ``multi_memory``, ``hierarchical``) token by token.

A memory layer cannot use a KV cache: it attends within a segment and reads a memory written once
per segment. `MemoryDecoder` gives each memory layer a `SegmentCache` (the memory of the complete
segments and the keys/values of the current one) and every other layer a static KV cache, so the
prompt and then each generated token is one cheap call, and the logits are those of one full
forward pass over the prompt and the tokens so far (up to floating-point rounding)::

    prompt ──▶ feed ──▶ logits ─ sample ─▶ token ──▶ feed ──▶ logits ─ ...
                 │                                     │
    memory layers: segment cache (memory + current segment's K/V; full segment ─▶ written)
    other layers:  KV cache (every position so far)

The memory carries like ``with carry_memory(model): model(prompt + tokens)``: a decoder may start
from a saved state (`legolm.layers.memory_state`), and `MemoryDecoder.memory_state` is the state
such a call would leave (the last, partial segment written). `generate_memory` is what
`legolm.generation.generate` runs for these models: each prompt alone (segment boundaries are per
sequence), from empty memory, or inside ``carry_memory(model)`` from the model's carried memory,
which it then updates.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from legolm.core.kv_cache import KVCache, KVStore
from legolm.errors import ConfigError
from legolm.generation.sampling import next_token
from legolm.layers.memory import MemoryAttention, MemoryBlock, MemoryLayer, SegmentCache
from legolm.layers.memory_state import check_memory_state, get_memory_state, memory_layers, set_memory_state
from legolm.model.transformer import TransformerLM
from legolm.utils.structure import walk_once

State = dict[str, Tensor]


def has_memory_layers(model: nn.Module) -> bool:
    """Whether ``model`` holds a memory layer (and so decodes through `MemoryDecoder`): one walk of its
    tree while no module changes (`walk_once`)."""
    return walk_once(model, _has_memory_layers)


def _has_memory_layers(model: nn.Module) -> bool:
    return bool(memory_layers(model))


def memory_blocks(model: TransformerLM) -> dict[int, MemoryAttention]:
    """Block index -> the `MemoryAttention` of each memory block.

    Raises:
        ConfigError: A memory layer that is not the attention of a `MemoryBlock` (it cannot be decoded
            incrementally).
    """
    found: dict[int, MemoryAttention] = {}
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if isinstance(block, MemoryBlock) and isinstance(attn, MemoryAttention):
            found[i] = attn
        elif any(isinstance(m, MemoryLayer) for m in block.modules()):
            raise ConfigError(f"block {i} ({type(block).__name__}) holds a memory layer that is not the attention "
                              "of a MemoryBlock: it cannot be decoded token by token")
    return found


class MemoryDecoder:
    """One sequence of a memory model, decoded call by call (see the module docstring).

    Args:
        model: A `TransformerLM` with memory layers (eval mode).
        max_len: Positions this decoder may hold (prompt + new tokens), at most the model's context.
        state: Memory to start from (`get_memory_state` names, batch 1); None = empty memory.
    """

    def __init__(self, model: TransformerLM, max_len: int, state: State | None = None) -> None:
        if max_len > model.config.block_size:
            raise ConfigError(f"{max_len} positions exceed the model's context of {model.config.block_size}")
        if state:
            _check_single(model, state)
        param = next(model.parameters())
        self.model, self.max_len, self.length = model, max_len, 0
        self.memory = memory_blocks(model)
        others = [i for i in range(model.config.n_layer) if i not in self.memory]
        self.kv = KVCache(model.config, 1, max_len, layers=others, dtype=param.dtype, device=param.device)
        self.segments = {i: attn.segment_cache(1, param.dtype, param.device, _layer_state(state, i, attn, model))
                         for i, attn in self.memory.items()}

    def feed(self, ids: Tensor) -> Tensor:
        """Add tokens (1, T) to the sequence; the logits (1, V) of the token after them."""
        T = ids.shape[1]
        if self.length + T > self.max_len:
            raise ConfigError(f"the decoder holds {self.max_len} positions; {self.length} + {T} do not fit")
        slots = torch.arange(self.length, self.length + T, device=ids.device)
        h = self.model.embed(ids, slots[None])
        ctx = self.model.make_context(slots[None], h.dtype, self.kv, slots)
        for i, block in enumerate(self.model.blocks):
            store: KVStore | SegmentCache | None = self.segments[i] if i in self.segments else self.kv.get(i)
            h = block(h, ctx, store)
        self.length += T
        return self.model.project(h[:, -1:])[:, -1]

    def memory_state(self) -> State:
        """The memory a carried call over everything fed so far leaves (`get_memory_state` names)."""
        names = _names(self.model)
        return {f"{names[i]}.{key}": t for i, attn in self.memory.items()
                for key, t in attn.flushed_state(self.segments[i]).items()}


def _check_single(model: TransformerLM, state: State) -> None:
    """``state`` must be a memory of this model for one sequence."""
    check_memory_state(model, state)
    batch = {int(v.shape[0]) for k, v in state.items() if k.endswith(".M")}
    if batch != {1}:
        raise ConfigError(f"the memory state holds {sorted(batch)} sequence(s); a decoder continues one "
                          "(call reset_memory(model) or load a single-sequence memory)")


def _names(model: TransformerLM) -> dict[int, str]:
    """Block index -> module name of its memory attention (``blocks.0.attn``)."""
    by_id = {id(m): name for name, m in model.named_modules()}
    return {i: by_id[id(attn)] for i, attn in memory_blocks(model).items()}


def _layer_state(state: State | None, index: int, attn: MemoryAttention, model: TransformerLM) -> State | None:
    if not state:
        return None
    prefix = _names(model)[index] + "."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _carried(model: TransformerLM) -> bool:
    return all(layer.carry for layer in memory_layers(model).values())


def generate_memory(model: TransformerLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    greedy: bool, temperature: float, top_k: int, top_p: float, seed: int | None,
                    eos_id: int | None) -> tuple[list[list[int]], float, float, int]:
    """Continue each prompt alone through a `MemoryDecoder`.

    Inside ``carry_memory(model)`` (one prompt) the decoder starts from the model's carried memory and
    leaves the memory of the prompt and its continuation in the model, as a forward call would.

    Returns:
        New tokens per prompt (EOS included when hit), prefill and decode seconds, decode steps.
    """
    carry = _carried(model)
    if carry and len(prompts) != 1:
        raise ConfigError(f"inside carry_memory a memory model continues one sequence; got {len(prompts)} prompts")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    rows, prefill_s, decode_s, steps = [], 0.0, 0.0, 0
    for prompt in prompts:
        start = get_memory_state(model) if carry else None
        dec = MemoryDecoder(model, len(prompt) + max_new_tokens, start)
        t0 = time.perf_counter()
        logits = dec.feed(torch.tensor([list(prompt)], device=device))
        t1 = time.perf_counter()
        row: list[int] = []
        while True:
            tok = int(next_token(logits, greedy, temperature, top_k, top_p, gen)[0])
            row.append(tok)
            if len(row) == max_new_tokens or tok == eos_id:
                break
            logits = dec.feed(torch.tensor([[tok]], device=device))
        steps = max(steps, len(row) - 1)
        if carry:
            dec.feed(torch.tensor([[row[-1]]], device=device))  # the last token belongs to the sequence too
            set_memory_state(model, dec.memory_state())
        rows.append(row)
        prefill_s, decode_s = prefill_s + t1 - t0, decode_s + time.perf_counter() - t1
    return rows, prefill_s, decode_s, steps

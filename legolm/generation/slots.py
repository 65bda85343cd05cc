"""Continuous batching: one static KV cache whose rows are independent sequences at their own lengths.

`generate` decodes a fixed batch that starts together (left-padded, one shared cache slot per
step). A server's requests arrive and finish at any time, so `SlotDecoder` gives every row its own
length instead: a new sequence is prefilled alone into a free row (its slots 0..P-1, positions
from 0), and each step feeds one token to rows 0..n-1, each at its own slot::

    row 0  [p p p p g g g g g · · ·]   slot 8  ─┐
    row 1  [p p g · · · · · · · · ·]   slot 2   ├─ one step: tokens (n, 1) at slots (n,), mask key <= slot
    row 2  (free: fed token 0 at slot 0)        │
    row 3  [p p p p p p p g · · · ·]   slot 7  ─┘

Keys past a row's slot (an earlier sequence's leftovers) are masked out, so a finished row is
reused without clearing. The step attends over the first S slots only, S the longest row rounded
up to ``context_bucket``, and rows up to the next power of two; on CUDA each (rows, S) shape is
captured once into a CUDA graph (one shared memory pool) and replayed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from legolm.core.context import LayerContext, attention_bias
from legolm.core.kv_cache import KVCache, LayerKVCache
from legolm.errors import ConfigError
from legolm.model.transformer import TransformerLM


class _RowsStore:
    """Rows 0..n-1 of one layer's cache, each writing its one new key/value at its own slot."""

    def __init__(self, layer: LayerKVCache, rows: Tensor, span: int) -> None:
        self.layer, self.rows, self.span = layer, rows, span

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k, v (n, H_kv, 1, D) written at slots ``input_pos`` (n,); the first ``span`` slots of the n rows."""
        n = self.rows.shape[0]
        self.layer.k[self.rows, :, input_pos] = k[:, :, 0].to(self.layer.k.dtype)  # (n, H_kv, D) at (row, slot)
        self.layer.v[self.rows, :, input_pos] = v[:, :, 0].to(self.layer.v.dtype)
        return self.layer.k[:n, :, : self.span], self.layer.v[:n, :, : self.span]


class _RowStore:
    """One row of one layer's cache, written from slot 0 by a prefill of ``length`` tokens."""

    def __init__(self, layer: LayerKVCache, row: int, length: int) -> None:
        self.k, self.v, self.length = layer.k[row: row + 1], layer.v[row: row + 1], length

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k[:, :, : self.length], self.v[:, :, : self.length]


def row_bucket(n: int, rows: int) -> int:
    """Rows a step runs for ``n`` rows in use: the next power of two, at most ``rows``."""
    return min(rows, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class SlotDecoder:
    """The static cache and step of continuous batching (see the module docstring).

    Args:
        model: The language model (eval mode; plain attention blocks: memory layers decode apart).
        rows: Sequences held at once (the batch capacity).
        max_len: Slots per row (prompt + new tokens of one sequence).
        context_bucket: A step attends over the longest row's slots rounded up to a multiple of this.
        cuda_graph: Capture each (rows, span) step shape into a CUDA graph (CUDA only).
    """

    def __init__(self, model: TransformerLM, rows: int, max_len: int, context_bucket: int,
                 cuda_graph: bool = True) -> None:
        if rows < 1 or max_len < 1 or context_bucket < 1:
            raise ConfigError(f"rows, max_len and context_bucket must be >= 1, got {rows}, {max_len}, {context_bucket}")
        if max_len > model.config.block_size:
            raise ConfigError(f"a cache of {max_len} slots exceeds the model's context of {model.config.block_size}")
        param = next(model.parameters())
        self.model, self.rows, self.max_len, self.bucket = model, rows, max_len, context_bucket
        self.device = param.device
        self.cache = KVCache(model.config, rows, max_len, dtype=param.dtype, device=param.device)
        self.tok = torch.zeros(rows, 1, dtype=torch.long, device=param.device)  # the step's static inputs
        self.slot = torch.zeros(rows, dtype=torch.long, device=param.device)
        self.row_ids = torch.arange(rows, device=param.device)
        self.use_graph = cuda_graph and param.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if self.use_graph else None  # shared by the graphs

    @torch.inference_mode()
    def prefill(self, row: int, ids: Sequence[int]) -> Tensor:
        """Write a sequence's prompt into ``row`` (slots 0..P-1); the logits (V,) of its next token."""
        P = len(ids)
        if not 0 < P <= self.max_len or not 0 <= row < self.rows:
            raise ConfigError(f"cannot prefill {P} tokens into row {row} of a {self.rows} x {self.max_len} cache")
        idx = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        slots = torch.arange(P, device=self.device)
        h = self.model.embed(idx, slots[None])
        ctx = self.model.make_context(slots[None], h.dtype)  # no mask: causal over the row's P slots
        ctx = dataclasses.replace(ctx, input_pos=slots)
        stores = {i: _RowStore(layer, row, P) for i, layer in self.cache.layers.items()}
        return self._blocks(h, ctx, stores)[0, -1]

    @torch.inference_mode()
    def step(self, tokens: Sequence[int], slots: Sequence[int]) -> Tensor:
        """Feed ``tokens[i]`` to row i at slot ``slots[i]`` (rows 0..n-1); their next-token logits (n, V).

        A row not in use gets any token at slot 0 (its output is ignored, its slot 0 rewritten by its
        next prefill).
        """
        n = len(tokens)
        if not 0 < n <= self.rows or len(slots) != n or max(slots) >= self.max_len:
            raise ConfigError(f"a step takes 1..{self.rows} rows at slots < {self.max_len}, got {n} rows, "
                              f"slots up to {max(slots, default=0)}")
        rows = row_bucket(n, self.rows)
        span = min(self.max_len, -(-(max(slots) + 1) // self.bucket) * self.bucket)
        host = torch.zeros(2, rows, dtype=torch.long)
        host[0, :n], host[1, :n] = torch.tensor(list(tokens)), torch.tensor(list(slots))
        host = host.to(self.device, non_blocking=True)
        self.tok[:rows, 0].copy_(host[0])
        self.slot[:rows].copy_(host[1])
        return self._run(rows, span)[:n]

    def _run(self, rows: int, span: int) -> Tensor:
        if not self.use_graph:
            return self._step(rows, span)
        key = (rows, span)
        if key not in self._graphs:
            self._graphs[key] = _capture(lambda: self._step(rows, span), self._pool)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def _step(self, rows: int, span: int) -> Tensor:
        """One token for rows 0..rows-1 from the static buffers; (rows, V) logits."""
        slot = self.slot[:rows]
        pos = slot[:, None]
        h = self.model.embed(self.tok[:rows], pos)
        keys = torch.arange(span, device=self.device)
        allowed = (keys[None, :] <= slot[:, None])[:, None, None, :]  # (rows, 1, 1, span)
        ctx = dataclasses.replace(self.model.make_context(pos, h.dtype), attn_bias=attention_bias(allowed, h.dtype),
                                  input_pos=slot)
        stores = {i: _RowsStore(layer, self.row_ids[:rows], span) for i, layer in self.cache.layers.items()}
        return self._blocks(h, ctx, stores)[:, -1]

    def _blocks(self, h: Tensor, ctx: LayerContext, stores: dict[int, _RowsStore] | dict[int, _RowStore]) -> Tensor:
        for i, block in enumerate(self.model.blocks):
            h = block(h, ctx, stores.get(i))
        return self.model.project(h[:, -1:])

    def graphs(self) -> int:
        """CUDA graphs captured so far (one per step shape)."""
        return len(self._graphs)


def _capture(fn: Callable[[], Tensor], pool: Any) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Warm ``fn`` up on a side stream, then record it into a graph drawing on ``pool``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out

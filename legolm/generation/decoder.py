"""One decode step (one new token per sequence) over a static KV cache, eager or as a CUDA graph.

The static cache never re-allocates and every input of the step lives in a fixed buffer, so on a
GPU the whole step (embedding, all layers, head) is captured once into a CUDA graph and replayed:
a single launch per token instead of hundreds, which is what decoding at batch 1 is bound by.
Optionally the step is compiled with `torch.compile` first (fused kernels, then captured).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from legolm.model.kv_cache import KVCache
from legolm.model.transformer import TransformerLM

StepFn = Callable[[TransformerLM, KVCache, "Tensor | None", Tensor, Tensor, Tensor], Tensor]


def decode_step(model: TransformerLM, cache: KVCache, pad_mask: Tensor | None, tok: Tensor, slot: Tensor,
                pos: Tensor) -> Tensor:
    """Logits (B, V) of one new token per row: ``tok`` (B, 1) at cache slot ``slot`` (1,), positions ``pos``."""
    return model(tok, cache=cache, input_pos=slot, positions=pos, pad_mask=pad_mask)[:, -1]


_compiled_step: StepFn | None = None


def compiled_decode_step() -> StepFn:
    """`decode_step` under `torch.compile`, created once so its compiled code is reused across calls."""
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(decode_step, fullgraph=True, dynamic=False)
    return _compiled_step


class Decoder:
    """Runs ``model`` one token at a time against ``cache``.

    Args:
        model: The language model (eval mode).
        cache: Its static KV cache, already holding the prompt.
        pad_mask: (B, S) key validity for left-padded prompts, or None.
        cuda_graph: Capture the step into a CUDA graph (CUDA only).
        compile: `torch.compile` the step before capture.
    """

    def __init__(self, model: TransformerLM, cache: KVCache, pad_mask: Tensor | None,
                 cuda_graph: bool = False, compile: bool = False) -> None:
        self.model, self.cache, self.pad_mask = model, cache, pad_mask
        self.fn: StepFn = compiled_decode_step() if compile else decode_step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.use_graph = cuda_graph
        device = cache.layers[next(iter(cache.layers))].k.device
        B = cache.batch
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.out: Tensor | None = None

    def __call__(self, tok: Tensor, slot: int, pos: Tensor) -> Tensor:
        """Logits (B, V) after feeding ``tok`` (B,) at cache slot ``slot`` and positions ``pos`` (B,)."""
        self.tok.copy_(tok[:, None])
        self.slot.fill_(slot)
        self.pos.copy_(pos[:, None])
        if not self.use_graph:
            return self.fn(self.model, self.cache, self.pad_mask, self.tok, self.slot, self.pos)
        if self.graph is None:
            self._capture()
        assert self.graph is not None and self.out is not None
        self.graph.replay()
        return self.out

    def _capture(self) -> None:
        """Warm up on a side stream (compilation, cuBLAS handles), then record the step."""
        # Warm-up runs write the current slot with the same inputs the replay writes again: harmless.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.fn(self.model, self.cache, self.pad_mask, self.tok, self.slot, self.pos)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.fn(self.model, self.cache, self.pad_mask, self.tok, self.slot, self.pos)

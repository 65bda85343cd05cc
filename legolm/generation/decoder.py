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
    """Runs ``model`` one token at a time against ``cache``, keeping all per-step state on the device.

    The tokens, cache slot, positions, EOS flags and output buffer are device tensors advanced in
    place, so a step needs no host work: with greedy decoding the argmax is part of the captured
    graph too, and one graph replay produces one token for every row.

    Args:
        model: The language model (eval mode).
        cache: Its static KV cache, already holding the prompt.
        pad_mask: (B, S) key validity for left-padded prompts, or None.
        max_new: Length of the output buffer.
        greedy: Take the argmax inside the step (else the caller samples from the returned logits).
        eos_id: Rows that emitted it keep emitting it; None = no stop.
        cuda_graph: Capture the step into a CUDA graph (CUDA only).
        compile: `torch.compile` the model step before capture.
    """

    def __init__(self, model: TransformerLM, cache: KVCache, pad_mask: Tensor | None, max_new: int,
                 greedy: bool, eos_id: int | None, cuda_graph: bool = False, compile: bool = False) -> None:
        self.model, self.cache, self.pad_mask = model, cache, pad_mask
        self.greedy, self.eos_id, self.use_graph = greedy, eos_id, cuda_graph
        self.fn: StepFn = compiled_decode_step() if compile else decode_step
        self.graph: torch.cuda.CUDAGraph | None = None
        device = cache.layers[next(iter(cache.layers))].k.device
        B = cache.batch
        self.tokens = torch.zeros(B, max_new, dtype=torch.long, device=device)  # generated so far
        self.t = torch.zeros(1, dtype=torch.long, device=device)  # tokens written
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=device)  # last token, next input
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.logits: Tensor | None = None

    def start(self, first: Tensor, slot: int, pos: Tensor) -> None:
        """Record the token sampled from the prompt's logits; it goes in at ``slot`` / ``pos`` (B,)."""
        self.slot.fill_(slot)
        self.pos.copy_(pos[:, None])
        self.emit(first)

    def emit(self, nxt: Tensor) -> None:
        """Append (B,) tokens: EOS rows stay at EOS, the output buffer and step counter advance."""
        if self.eos_id is not None:
            nxt = torch.where(self.finished, self.eos_id, nxt)
            self.finished |= nxt == self.eos_id
        self.tok.copy_(nxt[:, None])
        self.tokens.index_copy_(1, self.t, nxt[:, None])
        self.t += 1

    def _body(self) -> Tensor:
        logits = self.fn(self.model, self.cache, self.pad_mask, self.tok, self.slot, self.pos)  # (B, V)
        self.slot += 1
        self.pos += 1
        if self.greedy:
            self.emit(logits.argmax(dim=-1))
        return logits

    def step(self) -> Tensor:
        """Feed the last token; return the logits for the next (already emitted when greedy)."""
        if not self.use_graph:
            return self._body()
        if self.graph is None:
            self._capture()
        assert self.graph is not None and self.logits is not None
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        """Warm up on a side stream (compilation, cuBLAS handles), then record the step.

        The warm-up must not advance the decoding state, so it runs on a saved copy that is put back.
        """
        saved = [x.clone() for x in (self.tokens, self.t, self.tok, self.slot, self.pos, self.finished)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._body()  # one step only: it writes the next cache slot, which always exists
        torch.cuda.current_stream().wait_stream(stream)
        for buf, old in zip((self.tokens, self.t, self.tok, self.slot, self.pos, self.finished), saved, strict=True):
            buf.copy_(old)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._body()

"""One decode step (one new token per sequence) over a static KV cache, eager or as a CUDA graph.

The static cache never re-allocates and every input of the step lives in a fixed buffer, so on a
GPU the whole step (embedding, all layers, head, greedy argmax, EOS flags, slot advance) is
captured once into a CUDA graph and replayed: one launch per token instead of hundreds, which is
what decoding at batch 1 is bound by. Optionally the step is compiled with `torch.compile` first
(fused kernels, then captured). A `DecodeSession` owns the cache, the buffers and the graph of one
(batch, cache length) shape and is reused by later calls of that shape, so capture is paid once.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from legolm.core.kv_cache import KVCache
from legolm.model.transformer import TransformerLM


@dataclass
class DecodeState:
    """Per-step decoding state, all device tensors advanced in place.

    Attributes:
        tokens: (B, N) generated tokens.
        t: (1,) tokens written so far.
        tok: (B, 1) last token, the next input.
        slot: (1,) cache slot of the next input.
        pos: (B, 1) position id of the next input (per row: left padding shifts it).
        finished: (B,) rows that emitted EOS.
    """

    tokens: Tensor
    t: Tensor
    tok: Tensor
    slot: Tensor
    pos: Tensor
    finished: Tensor

    @classmethod
    def empty(cls, batch: int, max_new: int, device: torch.device) -> DecodeState:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(zeros(batch, max_new), zeros(1), zeros(batch, 1), zeros(1), zeros(batch, 1),
                   zeros(batch, dtype=torch.bool))

    def tensors(self) -> tuple[Tensor, ...]:
        return self.tokens, self.t, self.tok, self.slot, self.pos, self.finished


def emit(state: DecodeState, nxt: Tensor, eos_id: int | None) -> None:
    """Append (B,) tokens: EOS rows stay at EOS; the output buffer and step counter advance."""
    if eos_id is not None:
        nxt = torch.where(state.finished, eos_id, nxt)
        state.finished |= nxt == eos_id
    state.tok.copy_(nxt[:, None])
    state.tokens.index_copy_(1, state.t, nxt[:, None])
    state.t.add_(1)


def decode_step(model: TransformerLM, cache: KVCache, pad_mask: Tensor, state: DecodeState, greedy: bool,
                eos_id: int | None) -> Tensor:
    """Feed ``state.tok``; return the logits (B, V) of the next token (emitted here when greedy)."""
    logits = model(state.tok, cache=cache, input_pos=state.slot, positions=state.pos, pad_mask=pad_mask)[:, -1]
    state.slot.add_(1)
    state.pos.add_(1)
    if greedy:
        emit(state, logits.argmax(dim=-1), eos_id)
    return logits


StepFn = Callable[[TransformerLM, KVCache, Tensor, DecodeState, bool, "int | None"], Tensor]
_compiled_steps: dict[str, StepFn] = {}
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # the session captures its own CUDA graph


def compiled_decode_step(mode: str = "default") -> StepFn:
    """`decode_step` under `torch.compile` in ``mode``, created once per mode so its code is reused."""
    if mode not in _compiled_steps:
        _compiled_steps[mode] = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)
    return _compiled_steps[mode]


def capture(fn: Callable[[], Tensor], after_warmup: Callable[[], None] | None = None,
            record: Callable[[], Tensor] | None = None) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """Run ``fn`` once on a side stream (compilation, autotuning, cuBLAS handles), then record ``record``
    (default: ``fn``).

    Returns the graph (not yet replayed) and the recorded output tensor, which each replay rewrites.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = (record or fn)()
    return graph, out


class DecodeSession:
    """The cache, step buffers and (on CUDA) captured graph of one decoding shape.

    Args:
        model: The language model (eval mode).
        batch: Rows decoded together.
        max_len: Cache slots per row (prompt + new tokens, rounded up to a bucket).
        greedy: Take the argmax inside the step (else the caller samples from the returned logits).
        eos_id: Rows that emitted it keep emitting it; None = no stop.
        cuda_graph: Capture the step into a CUDA graph (CUDA only).
        compile: `torch.compile` the step before capture.
        compile_mode: `torch.compile` mode (one of `COMPILE_MODES`).
        step: Another step function of `decode_step`'s signature (the fused Triton step); None = the
            torch step (compiled when ``compile``).
        prefill_graphs: With ``cuda_graph``, the prefill of this many prompt lengths is kept as CUDA
            graphs (least recently used dropped); 0 = eager prefill.
    """

    def __init__(self, model: TransformerLM, batch: int, max_len: int, greedy: bool, eos_id: int | None,
                 cuda_graph: bool = False, compile: bool = False, compile_mode: str = "default",
                 step: StepFn | None = None, prefill_graphs: int = 0) -> None:
        param = next(model.parameters())
        # A weak reference: sessions are cached per model, and must not keep it alive.
        self._model = weakref.ref(model)
        self.greedy, self.eos_id, self.use_graph = greedy, eos_id, cuda_graph
        self.cache = KVCache(model.config, batch, max_len, dtype=param.dtype, device=param.device)
        model.reserve_positions(max_len)  # a fused step reads model.rope directly
        self.pad_mask = torch.ones(batch, max_len, dtype=torch.bool, device=param.device)  # (B, S) real keys
        self.state = DecodeState.empty(batch, max_len, param.device)
        self.fn: StepFn = step or (compiled_decode_step(compile_mode) if compile else decode_step)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}  # steps -> graph of them, last logits
        self.prefill_graphs = prefill_graphs if cuda_graph else 0
        self._prefills: OrderedDict[int, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]] = OrderedDict()

    @property
    def model(self) -> TransformerLM:
        model = self._model()
        assert model is not None, "the model of this decoding session was freed"
        return model

    def prefill(self, idx: Tensor, lengths: Tensor) -> Tensor:
        """Write left-padded prompts (B, P) with true ``lengths`` (B,) into the cache; last logits (B, V).

        With prefill graphs, a prompt length seen before replays its captured graph (one launch
        instead of hundreds); a new one is captured (and the least recently used dropped).
        """
        if not self.prefill_graphs:
            return self._prefill(idx, lengths)
        P = idx.shape[1]
        if P not in self._prefills:
            self._prefills[P] = self._capture_prefill(idx, lengths)
            while len(self._prefills) > self.prefill_graphs:
                self._prefills.popitem(last=False)
        self._prefills.move_to_end(P)
        graph, idx_buf, len_buf, out = self._prefills[P]
        idx_buf.copy_(idx)
        len_buf.copy_(lengths)
        graph.replay()
        return out

    def _prefill(self, idx: Tensor, lengths: Tensor) -> Tensor:
        P, S = idx.shape[1], self.cache.max_len
        keys = torch.arange(S, device=idx.device)
        self.pad_mask.copy_(keys[None, :] >= (P - lengths)[:, None])
        positions = (keys[None, :P] - (P - lengths)[:, None]).clamp(min=0)  # (B, P)
        h = self.model(idx, cache=self.cache, input_pos=keys[:P], positions=positions, pad_mask=self.pad_mask,
                       logits=False)  # (B, P, C) after the final norm: only the last position needs the head
        return self.model.lm_head(h[:, -1])

    def _capture_prefill(self, idx: Tensor, lengths: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]:
        """Record the prefill of this prompt shape on static copies of its inputs (replayed by the caller)."""
        idx_buf, len_buf = idx.clone(), lengths.clone()
        graph, out = capture(lambda: self._prefill(idx_buf, len_buf))
        return graph, idx_buf, len_buf, out

    def start(self, first: Tensor, slot: int, lengths: Tensor) -> None:
        """Reset the step state and record the token sampled from the prompt's logits."""
        for buf in self.state.tensors():
            buf.zero_()
        self.state.slot.fill_(slot)
        self.state.pos.copy_(lengths[:, None])
        emit(self.state, first, self.eos_id)

    def emit(self, nxt: Tensor) -> None:
        emit(self.state, nxt, self.eos_id)

    def step(self, steps: int = 1) -> Tensor:
        """Feed the last token ``steps`` times; return the logits of the last step (already emitted when greedy).

        Several steps need greedy decoding (each step emits its own token on the device); with a CUDA
        graph they replay as one graph of ``steps`` steps (captured at its first use): no gap between
        two graph launches, and one launch for the host to issue.
        """
        if steps > 1 and not self.greedy:
            raise ValueError(f"{steps} steps at once need greedy decoding: the caller samples each token")
        if not self.use_graph:
            return self._run(steps)
        if steps not in self.graphs:
            self.graphs[steps] = self._capture(steps)
        graph, logits = self.graphs[steps]
        graph.replay()
        return logits

    def _capture(self, steps: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        """Record ``steps`` steps. The warm-up must not advance the decoding state, so the state is put back."""
        saved = [x.clone() for x in self.state.tensors()]

        def restore() -> None:
            for buf, old in zip(self.state.tensors(), saved, strict=True):
                buf.copy_(old)

        # one warm-up step only: it writes the next cache slot, which always exists
        return capture(lambda: self._run(1), restore, lambda: self._run(steps))

    def _run(self, steps: int) -> Tensor:
        for _ in range(steps):
            logits = self.fn(self.model, self.cache, self.pad_mask, self.state, self.greedy, self.eos_id)
        return logits

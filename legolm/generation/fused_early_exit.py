"""LEGO decoding inside the fused decoder: early exit and self-speculative, batch 1, greedy.

Both decoders are built from the fused Triton block kernels of ``--fused`` (`FusedStack`), keep
every decision on the device, and on a GPU replay CUDA graphs of several tokens; nothing is read
back to the host between tokens.

Threshold early exit (CALM, Schuster et al. 2022, arXiv 2207.07061), one step::

    embed ─ lower blocks ─ shallow head ─ exit_kernel: conf >= τ ? emit the shallow token : deep = 1
                            (confidence partials)              │
    IF deep (a conditional graph node):                        ▼
        skip: upper blocks at the next dense upper slot ─ deep head ─ emit
        fill: IF flush[b] (one node per bucket b): the q queued exited tokens and this one, b >= q + 1
              rows, through the upper blocks at their positions (`legolm.kernels.rows`) ─ deep head on
              this token's row ─ emit         (a full queue flushes without a deep token)
    skip: the exit kernel (an exiting token) or the deep emit advances the position: no further launch
    fill: the next step opens with the tick: position + 1; the queue empties or grows
    The exit and emit kernels wait for their head as programmatic dependents (PDL), as `advance_kernel` does.

Self-speculative decoding (LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710), one round::

    d + 1 lower steps: the last token and d greedy drafts of the drafter (their lower K/V kept)
    one row pass of the upper blocks over those d + 1 positions ─ deep head per row
    accept_kernel: keep the drafts up to the first one the deep model disagrees with, plus its token

The drafter is `LegoLM.drafter`: the draft exit where phase 3 made one, else the shallow exit;
threshold mode always reads the shallow exit.

On a GPU each round is an IF node gated on ``live`` (the accept kernel clears it once the call has its
tokens or an EOS), so a replay of ``steps_per_graph`` rounds stops doing work where the call is done
instead of running whole rounds past it.

Self-speculative output equals full-depth greedy decoding: every kept token is the deep model's
greedy choice on a history of kept tokens, whose upper-layer K/V are exact (rejected drafts leave
stale entries only in slots that later positions overwrite before anyone reads them).

The IF nodes come from `legolm.kernels.graph_if` (torch's own where it records them, else the driver
API; by default in skip mode, where they measured faster). Without them (``if_nodes`` off, fill
mode by default, a driver older than CUDA 12.4, no ``libcudadevrt.a``) threshold mode replays one
graph per part of a step and the host reads the step's conditions once; without CUDA
(Triton's interpreter in the tests) the same kernels run eagerly and the host reads each condition:
the arithmetic is the same, only slower.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from legolm.core.kv_cache import KVCache
from legolm.errors import ConfigError
from legolm.generation.decoder import capture
from legolm.generation.early_exit import EarlyExitStats, block_weights, speculative_stats
from legolm.generation.fused import FusedStack, exit_norm
from legolm.kernels import graph_if
from legolm.model.lego import ExitHead, LegoLM, confidence, exits

Branch = Callable[[Tensor, Callable[[], None]], None]


@dataclass(frozen=True)
class FusedExitConfig:
    """Settings of the fused LEGO decoders (`GenerationConfig` fills them).

    Attributes:
        mode: ``threshold`` (early exit) or ``speculative``.
        kv_mode: Threshold mode's upper cache for exited tokens: ``fill`` (exact) or ``skip``.
        draft_tokens: Speculative mode's drafts per round (d >= 1).
        fill_buckets: Row counts of the lazy-fill passes (a queue of q exited tokens runs in the
            smallest bucket >= q + 1; the largest bucket bounds the queue).
        steps_per_graph: Tokens (threshold) or rounds (speculative) per captured CUDA graph; threshold mode
            also captures graphs of 2^i fewer steps for the end of a call, so no step runs past its last token.
            Speculative rounds past the call's last token are skipped where IF nodes gate them.
        attention_block: Cache slots per attention tile when not tuned.
        embed_block: Channels per tile of the embedding and row-copy kernels.
        tune: Time the launch shapes at the first use on a GPU.
        pdl: Programmatic dependent launch of the GEMV and attention kernels where supported (`FusedStack`).
        split_k: Every block in three launches (`FusedStack`): one-token steps, drafts, lazy-fill passes and
            verify passes (rows).
        exact_sums: Split-K sums exact (`FusedStack`); speculative mode always takes them: they keep its output
            equal, bit for bit, to the greedy output of the full-depth ``splitk-exact`` decoder, as five-kernel
            blocks keep it equal to theirs.
        prefill_graphs: Prompt lengths whose start (reset, prefill, first token) is kept as a CUDA graph (LRU);
            0 = eager.
        if_nodes: Threshold mode's branches as IF nodes of the captured graphs where the driver has them
            (`legolm.kernels.graph_if`: no host read per token, ``steps_per_graph`` tokens per replay);
            False, or where they are missing: one graph per part of a step, the host reads its conditions.
            None (the default) picks what measured faster on an H200 (README, LEGO): IF nodes in skip mode
            (1.48x against 1.41x the split-K full-depth decoder), the host read in fill mode (one IF node
            per flush bucket and step cost more than the read: 0.92x against 1.01x). Speculative mode:
            each round an IF node gated on "this call wants more tokens" unless False (ungated, a replay
            runs all its rounds, also those past the last token).
    """

    mode: str = "threshold"
    kv_mode: str = "skip"
    draft_tokens: int = 4
    fill_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)
    steps_per_graph: int = 16
    attention_block: int = 64
    embed_block: int = 1024
    tune: bool = True
    pdl: bool = True
    split_k: bool = False
    exact_sums: bool = False
    prefill_graphs: int = 4
    if_nodes: bool | None = None


def pick_runner(config: FusedExitConfig, device: torch.device) -> str:
    """How a unit runs: "graph" (several units per CUDA graph, each branch or speculative round an IF node),
    "rounds" (speculative without IF nodes: several ungated rounds per graph), "parts" (threshold without
    them: graphs of the step's parts, the host reads the conditions once a step) or "eager" (no CUDA:
    kernels launched one by one, the host reads the conditions).

    ``if_nodes`` None takes IF nodes where they measured faster (skip mode, speculative rounds); where they
    are missing, the host read, with a warning only if they were asked for by name.
    """
    if device.type != "cuda":
        return "eager"
    speculative = config.mode == "speculative"
    without = "rounds" if speculative else "parts"
    wanted = (speculative or config.kv_mode != "fill") if config.if_nodes is None else config.if_nodes
    if not wanted:
        return without
    missing = graph_if.unavailable_reason(device)
    if missing is not None and config.if_nodes:
        then = "each replay runs all its rounds" if speculative else "the host reads each token's decision"
        warnings.warn(f"fused_if_nodes: {missing}; {then} instead", stacklevel=3)
    return without if missing is not None else "graph"


@dataclass(frozen=True)
class _HostReport:
    """Pinned host copies of a call's results: tokens, exit flags, counts (t, flushes, accepted drafts, rounds)."""

    tokens: Tensor
    exited: Tensor
    counts: Tensor


class FusedLegoSession:
    """Caches, device state and captured graphs of one (model, cache length, settings) for batch-1 LEGO decoding.

    Args:
        model: An extended `LegoLM` (eval mode) with plain GPT-2 / Pythia / Llama blocks.
        max_len: Cache slots (prompt + new tokens + the overshoot of one graph).
        max_new: Tokens the output buffers hold (new tokens + one graph's overshoot).
        eos_id: Stop id (rows keep emitting it), or None.
        config: The decoder's settings.
    """

    def __init__(self, model: LegoLM, max_len: int, max_new: int, eos_id: int | None,
                 config: FusedExitConfig) -> None:
        import legolm.kernels.decode as kd

        if not model.extended or model.shallow_exit is None:
            raise ConfigError("early exit needs a LEGO model with two exits (legolm lego's model/ directory)")
        if config.mode not in ("threshold", "speculative"):
            raise ConfigError(f"fused LEGO decoding is threshold or speculative, got {config.mode!r}")
        if config.mode == "threshold" and config.kv_mode not in ("fill", "skip"):
            raise ConfigError(f"fused early exit supports kv_mode fill or skip, got {config.kv_mode!r}; "
                              "decode without --fused for propagate")
        self.kd, self.model, self.config, self.eos_id = kd, model, config, eos_id
        c, p = model.config, model.lm_head.weight
        self.fill = config.mode == "threshold" and config.kv_mode == "fill"
        rows = config.draft_tokens + 1 if config.mode == "speculative" else max(config.fill_buckets) if self.fill \
            else 0
        self.stack = FusedStack(model, config.attention_block, config.embed_block, config.tune, rows=rows,
                                pdl=config.pdl, split_k=config.split_k,
                                exact_sums=config.exact_sums or config.mode == "speculative")
        self.shallow_norm = exit_norm(model.shallow_exit.norm)  # threshold mode's exit, never the draft exit
        drafter = model.drafter  # speculative mode's exit: the draft exit where there is one
        assert drafter is not None
        self.drafter: ExitHead = drafter
        self.draft_norm = exit_norm(self.drafter.norm)
        self.cache = KVCache(c, 1, max_len, dtype=p.dtype, device=p.device)
        model.reserve_positions(max_len)  # the kernels read model.rope, in graphs captured before any prefill
        dev = p.device

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=dev)

        self.state = kd.StepState(tok=zeros(1, 1), tokens=zeros(max_new), t=zeros(1),
                                  exited=zeros(max_new, dtype=torch.int8), finished=zeros(1, dtype=torch.bool),
                                  pos=zeros(1))
        self.tau = zeros(1, dtype=torch.float32)
        self.flags = zeros(1 + len(config.fill_buckets), dtype=torch.bool)  # one read gives every condition
        # "parts": the lower graph ends by copying the flags into pinned host memory, and the host waits on
        # an event instead of a pageable `.tolist()` (no allocation, no staging copy on the token's critical path)
        self.host_flags = torch.zeros(self.flags.shape, dtype=torch.bool, pin_memory=p.is_cuda)
        self.flags_ready = torch.cuda.Event() if p.is_cuda else None
        self.deep, self.flush = self.flags[:1], self.flags[1:]
        self.uslot = zeros(1)  # skip mode: the next dense slot of the upper cache
        self.q = zeros(1)  # fill mode: exited tokens waiting for the upper layers
        self.buckets = torch.tensor(sorted(config.fill_buckets), device=dev)
        self.flushes = zeros(1)
        self.ring = zeros(max(config.fill_buckets), c.n_embd, dtype=self.stack.x.dtype)  # lower states, as stored
        self.drafts = zeros(max(config.draft_tokens, 1))
        self.dpos, self.di = zeros(1), zeros(1)
        self.spec_stats = zeros(2)  # accepted drafts, rounds
        self.limit = zeros(1)  # speculative: the call's tokens; `live` gates the next round (the accept kernel)
        self.live = zeros(1, dtype=torch.bool)
        # what a call reads back, copied into pinned host memory at once after its last replay (one wait), and the
        # prompt's staging buffer (its copy to the device does not wait for the host)
        pinned = p.is_cuda
        self.host = _HostReport(torch.zeros(max_new, dtype=torch.long, pin_memory=pinned),
                                torch.zeros(max_new, dtype=torch.int8, pin_memory=pinned),
                                torch.zeros(4, dtype=torch.long, pin_memory=pinned))
        self.host_prompt = torch.zeros(max_len, dtype=torch.long, pin_memory=pinned)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # units per replay -> graph ("graph", "rounds")
        self.parts: tuple[torch.cuda.CUDAGraph, list[tuple[int, torch.cuda.CUDAGraph]]] | None = None
        self.runner = pick_runner(config, p.device)
        self.prefill_graphs = config.prefill_graphs if p.is_cuda else 0
        self._prefills: OrderedDict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = OrderedDict()  # P -> graph, prompt
        self.host_tau = torch.zeros(1, dtype=torch.float32, pin_memory=pinned)  # a call's τ and token limit
        self.host_limit = torch.zeros(1, dtype=torch.long, pin_memory=pinned)
        self.warmed = False

    # -- one token / one round -------------------------------------------------------------------
    def _threshold_step(self, branch: Branch) -> None:
        self._lower_part()
        for index, fn in self._branches():
            branch(self.flags[index], fn)

    def _lower_part(self) -> None:
        """Fill: the previous step's tick; then embedding, lower blocks, the shallow exit and its decision.

        Fill's tick (position + 1, the queue) opens the step rather than closing the last one, so a step
        without the upper layers is one graph (`start` sets the position one short). Skip has no queue: an
        exiting token's decision advances the position, a deep token's emit does (`_skip_deep`).
        """
        st, m, s = self.stack, self.model, self.state
        assert m.shallow_exit is not None
        if self.fill:
            self._tick()
        st.token(m, self.cache, m.split, s.tok, s.pos, s.pos)
        if self.fill:
            st.kr.put_row(st.x, self.ring, s.pos, st.embed_block)
        n = st.head(self.shallow_norm, m.shallow_exit.head, "confidence", lens=m.shallow_exit.lens)
        fill = (self.q, self.buckets, self.flush) if self.fill else None
        self.kd.exit_((st.partial[0], st.partial[1], st.partial[2]), n, self.tau, self.deep, s, self.eos_id,
                      self.kd.ADVANCE_BLOCK, fill, advance=not self.fill, pdl=st.pdl)

    def _lower_part_to_host(self) -> None:
        """`_lower_part`, then its conditions copied to ``host_flags`` (the "parts" runner's lower graph)."""
        self._lower_part()
        self.host_flags.copy_(self.flags, non_blocking=True)

    def _branches(self) -> list[tuple[int, Callable[[], None]]]:
        """The step's conditional parts, in order: (index of its condition in ``flags``, what runs when it is set).

        ``flags[0]`` is "deep" (the upper layers run for this token), ``flags[1 + i]`` "flush bucket i".
        """
        if not self.fill:
            return [(0, self._skip_deep)]
        flushes = [(1 + i, functools.partial(self._flush, rows)) for i, rows in enumerate(self.config.fill_buckets)]
        return [*flushes, (0, self._fill_deep)]

    def _tick(self) -> None:
        self.kd.tick(self.state.pos, (self.q, self.flush, self.flushes) if self.fill else None)

    def _skip_deep(self) -> None:
        st, m, s = self.stack, self.model, self.state
        st.blocks(m, self.cache, m.split, m.n_layer, self.uslot, s.pos)
        n = st.head(st.final_norm, m.lm_head, "greedy")
        self.kd.emit(st.partial, n, s.tok, s.tokens, s.t, s.finished, self.eos_id, self.kd.ADVANCE_BLOCK, self.uslot,
                     pos=s.pos, pdl=st.pdl)

    def _flush(self, rows: int) -> None:
        st, m, s = self.stack, self.model, self.state
        st.kr.gather_rows(self.ring, st.X, st.start, s.pos, self.q, rows, st.embed_block)
        st.rows_blocks(m, self.cache, m.split, m.n_layer, rows)

    def _fill_deep(self) -> None:
        st, m, s = self.stack, self.model, self.state
        st.kr.select_row(st.X, st.h, self.q, st.embed_block)  # this token's row (after the q queued ones)
        n = st.head(st.final_norm, m.lm_head, "greedy", x=st.h)
        self.kd.emit(st.partial, n, s.tok, s.tokens, s.t, s.finished, self.eos_id, self.kd.ADVANCE_BLOCK, pdl=st.pdl)

    def _speculative_round(self) -> None:
        st, kd, m, s, d = self.stack, self.kd, self.model, self.state, self.config.draft_tokens
        for i in range(d + 1):
            st.token(m, self.cache, m.split, s.tok, self.dpos, self.dpos, out=st.X[i])  # the row the upper pass reads
            if i < d:
                n = st.head(self.draft_norm, self.drafter.head, "greedy", x=st.X[i], lens=self.drafter.lens)
                kd.emit(st.partial, n, s.tok, self.drafts, self.di, s.finished, None, kd.ADVANCE_BLOCK, self.dpos,
                        pdl=st.pdl)
        st.rows_blocks(m, self.cache, m.split, m.n_layer, d + 1)
        n = st.rows_head(st.final_norm, m.lm_head, d + 1)
        st.kr.accept((st.rows_partial[0], st.rows_partial[1]), n, self.drafts, d + 1, s.tok, s.tokens, s.t,
                     s.finished, self.eos_id, s.pos, self.dpos, st.start, self.di, self.spec_stats, self.limit,
                     self.live, kd.ADVANCE_BLOCK)

    def _unit(self, branch: Branch) -> None:
        if self.config.mode == "speculative":
            branch(self.live, self._speculative_round)
        else:
            self._threshold_step(branch)

    # -- prefill and start ------------------------------------------------------------------------
    def _prefill_torch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """All layers over the prompt (1, P) into the cache; the shallow and deep logits of its last token."""
        m = self.model
        h_s, top = m.both_parts(idx, cache=self.cache, input_pos=torch.arange(idx.shape[1], device=idx.device))
        return m.shallow_head(h_s[:, -1]), m.project(top[:, -1])  # (1, V) each

    def _start_device(self, idx: Tensor) -> Tensor:
        """Everything `start` does on the device for the prompt ``idx`` (1, P): reset the state, prefill, the first
        token by the rule of the mode (τ and the call's token limit read from the device); returns the token."""
        s, P = self.state, idx.shape[1]
        for buf in (s.tokens, s.t, s.exited, s.finished, self.q, self.flushes, self.di, self.spec_stats, self.flags):
            buf.zero_()
        shallow, deep = self._prefill_torch(idx)
        if self.config.mode == "speculative":
            first, ex = deep.argmax(-1), torch.zeros(1, dtype=torch.bool, device=deep.device)
        else:
            ex = exits(confidence(shallow), self.tau)
            first = torch.where(ex, shallow.argmax(-1), deep.argmax(-1))
        s.tok.copy_(first[:, None])
        s.tokens[:1].copy_(first)
        s.exited[:1].copy_(ex)
        s.t.fill_(1)
        if self.eos_id is not None:
            torch.eq(first, self.eos_id, out=s.finished)
        for buf in (s.pos, self.uslot, self.dpos):
            buf.fill_(P)
        if self.config.mode == "speculative":  # the first row pass's position; the gate of the first round
            self.stack.start.fill_(P)
            torch.logical_and(~s.finished, self.limit > 1, out=self.live)
        elif self.fill:  # one short: the first step's tick (closing the prefill) fixes them
            s.pos.fill_(P - 1)
            self.q.fill_(-1)
        return s.tok

    def start(self, prompt: Tensor, threshold: float, max_new_tokens: int) -> None:
        """Prefill and the first token, and reset the device state: ``prompt`` (P,) in host memory (pinned on a
        GPU). τ and the token limit follow it as asynchronous copies; on a GPU the rest is one replay of a graph
        captured per prompt length (the last `prefill_graphs` lengths kept), where it took some twenty launches."""
        dev = self.tau.device
        self.host_tau[0], self.host_limit[0] = threshold, max_new_tokens
        self.tau.copy_(self.host_tau, non_blocking=True)
        self.limit.copy_(self.host_limit, non_blocking=True)
        if not self.prefill_graphs:
            self._start_device(prompt.to(dev)[None])
            return
        P = prompt.shape[0]
        entry = self._prefills.get(P)
        buf = entry[1] if entry is not None else torch.empty(1, P, dtype=torch.long, device=dev)
        buf[0].copy_(prompt, non_blocking=True)
        if entry is None:  # capture's warm-up runs it once; the replay below runs it again
            entry = self._prefills[P] = (capture(lambda: self._start_device(buf))[0], buf)
            while len(self._prefills) > self.prefill_graphs:
                self._prefills.popitem(last=False)
        self._prefills.move_to_end(P)
        entry[0].replay()

    # -- running -------------------------------------------------------------------------------
    def run_units(self, wanted: int) -> int:
        """One token (threshold) or round (speculative), or with ``runner`` "graph" / "rounds" one graph of
        several: `steps_per_graph`, or in threshold mode the largest power of two not past the ``wanted`` tokens
        (a call's last tokens replay no steps beyond its end). Returns the units run."""
        if self.runner == "eager":
            self._unit(_host_branch)
            return 1
        if self.runner in ("graph", "rounds"):
            assert self.graphs, "warm_up() captures the graphs before the first prefill"
            n = max((k for k in self.graphs if k <= wanted), default=self.config.steps_per_graph)
            self.graphs[n].replay()
            return n
        assert self.parts is not None, "warm_up() captures the graphs before the first prefill"
        lower, branches = self.parts
        lower.replay()  # ends with the flags' copy into host_flags
        if self.flags_ready is not None:
            self.flags_ready.record()
            self.flags_ready.synchronize()  # the one wait of a step
        flags = self.host_flags.tolist()
        for index, graph in branches:
            if flags[index]:
                graph.replay()
        return 1

    def read_back(self) -> _HostReport:
        """Tokens, exit flags and counters (t, lazy-fill flushes, accepted drafts, rounds) into the pinned host
        buffers: asynchronous copies and one wait, instead of a synchronising read each."""
        s, h = self.state, self.host
        h.counts[:1].copy_(s.t, non_blocking=True)
        h.counts[1:2].copy_(self.flushes, non_blocking=True)
        h.counts[2:].copy_(self.spec_stats, non_blocking=True)
        h.tokens.copy_(s.tokens, non_blocking=True)
        h.exited.copy_(s.exited, non_blocking=True)
        if h.tokens.is_pinned():
            torch.cuda.current_stream().synchronize()
        return h

    def warm_up(self) -> None:
        """Tune and compile every kernel of every branch once, then capture the graphs (before the first prefill).

        A kernel compiled during capture would not be recorded, and capture must not run inside a
        generation (it would advance its state): so it all happens here, once per session.
        Triton's interpreter (no CUDA) compiles nothing and captures nothing.
        """
        if self.warmed or self.runner == "eager":
            return
        self.stack.ensure_tuned(self.model, self.cache)
        self.state.pos.fill_(0)
        self._unit(_both_branches)
        torch.cuda.synchronize()
        if self.runner in ("graph", "rounds"):
            self.graphs = {n: _record(functools.partial(self._units, n)) for n in self._units_per_graph()}
        else:
            self.parts = (_record(lambda graph: self._lower_part_to_host()),
                          [(index, _record(functools.partial(_call, fn))) for index, fn in self._branches()])
        torch.cuda.synchronize()
        self.warmed = True

    def _units_per_graph(self) -> list[int]:
        """`steps_per_graph`, and in threshold mode the powers of two below it (the tail of a call)."""
        n = self.config.steps_per_graph
        tails = [2 ** i for i in range(n.bit_length()) if 2 ** i < n] if self.config.mode == "threshold" else []
        return [n, *tails]

    def _units(self, n: int, graph: torch.cuda.CUDAGraph) -> None:
        """``n`` units into ``graph``, each branch (or round) an IF node of it ("rounds": ungated)."""
        branch = _conditional if self.runner == "graph" else _both_branches
        for _ in range(n):
            self._unit(branch)


def _call(fn: Callable[[], None], graph: torch.cuda.CUDAGraph) -> None:
    fn()


def _record(fn: Callable[[torch.cuda.CUDAGraph], None]) -> torch.cuda.CUDAGraph:
    """Capture ``fn(graph)`` into a new CUDA graph on a side stream (kernels compiled already; nothing runs)."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=stream):
        fn(graph)
    torch.cuda.current_stream().wait_stream(stream)
    return graph


def _conditional(pred: Tensor, fn: Callable[[], None]) -> None:
    """A branch recorded as an IF node of the graph being captured: it runs at replay where ``pred`` is set."""
    with graph_if.if_node(pred):
        fn()


def _host_branch(pred: Tensor, fn: Callable[[], None]) -> None:
    if bool(pred.item()):
        fn()


def _both_branches(pred: Tensor, fn: Callable[[], None]) -> None:
    fn()


@torch.inference_mode()
def fused_lego_generate(session: FusedLegoSession, prompt: Sequence[int], max_new_tokens: int, threshold: float,
                        eos_check_every: int) -> tuple[list[int], EarlyExitStats]:
    """Greedy batch-1 LEGO decoding of ``prompt`` (token ids) on a prepared session: the new tokens and stats.

    The prompt goes through a pinned staging buffer and everything the call reports comes back in one copy
    (`FusedLegoSession.read_back`): the host's fixed cost per call, which no exit saves, stays small.
    """
    dev = session.stack.x.device
    sync: Callable[[], None] = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    session.warm_up()
    staged = session.host_prompt[:len(prompt)]
    staged.copy_(torch.tensor(prompt, dtype=torch.long))
    sync()
    t0 = time.perf_counter()
    session.start(staged, threshold, max_new_tokens)
    sync()
    t1 = time.perf_counter()
    units, replays = 0, 0
    speculative = session.config.mode == "speculative"
    while not (_spent(session) if speculative else _spent_steps(session, units, replays, max_new_tokens,
                                                                     eos_check_every)):
        units, replays = units + session.run_units(max_new_tokens - 1 - units), replays + 1
    report = session.read_back()
    t2 = time.perf_counter()
    n = min(int(report.counts[0]), max_new_tokens)
    tokens = report.tokens[:n].tolist()
    return tokens, _stats(session, report, tokens, t1 - t0, t2 - t1)


def _spent(session: FusedLegoSession) -> bool:
    """Speculative: rounds emit 1..d+1 tokens; the host reads after each replay whether more are wanted."""
    return not bool(session.live.item())


def _spent_steps(session: FusedLegoSession, units: int, replays: int, max_new_tokens: int,
                 eos_check_every: int) -> bool:
    """Threshold: one token per step; the EOS flag is read every ``eos_check_every`` replays."""
    if units >= max_new_tokens - 1:
        return True
    return session.eos_id is not None and replays % eos_check_every == 0 and bool(session.state.finished.item())


def _stats(session: FusedLegoSession, report: _HostReport, row: list[int], prefill_s: float,
           decode_s: float) -> EarlyExitStats:
    """Counts and costs of a fused LEGO call (layer calls and weights read per decoded token vs full depth)."""
    m = session.model
    L, k = m.n_layer, m.split
    eos, n = session.eos_id, len(row)
    kept = n if eos is None or eos not in row else row.index(eos) + 1
    if session.config.mode == "speculative":
        accepted, rounds = (int(v) for v in report.counts[2:].tolist())
        return speculative_stats(m, session.config.draft_tokens, rounds, accepted, kept, prefill_s, decode_s)
    blocks, head = block_weights(m)
    full = sum(blocks) + head
    lower, upper = sum(blocks[:k]) + head, sum(blocks[k:]) + head
    steps = max(n - 1, 1)
    exited = report.exited[:n].tolist()
    shallow = sum(exited[:kept])
    deep_steps = n - 1 - sum(exited[1:n])
    passes = int(report.counts[1]) if session.fill else deep_steps
    calls = (n - 1) * k + passes * (L - k)
    weights = (n - 1) * lower + passes * upper
    return EarlyExitStats(
        shallow_count=shallow, deep_count=kept - shallow, shallow_ratio=shallow / max(kept, 1), decode_steps=steps,
        layer_calls=calls + L, prefill_layer_calls=L, token_layer_evals=(n - 1) * k + deep_steps * (L - k),
        actual_compute_cost=((n - 1) * k + deep_steps * (L - k)) / (steps * L), call_cost=calls / (steps * L),
        macs_cost=weights / (steps * full), kv_projections=0, prefill_s=prefill_s, decode_s=decode_s,
        wall_s=prefill_s + decode_s, kv_mode=session.config.kv_mode)

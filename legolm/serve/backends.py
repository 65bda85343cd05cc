"""How the engine decodes: one `Backend` per model kind, all behind the same three calls.

``admit(job)`` prefills a request and chooses its first token; ``step(jobs)`` chooses the next token
of every running request; ``release(job)`` frees what it held. Which one serves (`make_backend`):

- `SlotBackend`: plain models (GPT-2, Pythia, Llama, GGUF, a LEGO model decoded at full depth):
  continuous batching over one static KV cache (`legolm.generation.slots.SlotDecoder`).
- `MemoryBackend`: memory-layer models: one `MemoryDecoder` per request (memory carried across
  the prompt and the new tokens; sessions), stepped one after another.
- `FusedBackend`: ``--fused`` on a plain model: one fused batch-1 `DecodeSession` (Triton kernels,
  CUDA graph) per running request, stepped one after another.
- `LegoBackend`: ``--early-exit`` on a LEGO model: each request decoded whole by
  `legolm.generation.generate` (the early-exit decoders have no step API), then its tokens handed
  out one per step.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from legolm.errors import ConfigError, LegolmError
from legolm.generation.decoder import DecodeSession
from legolm.generation.fused import check_fused
from legolm.generation.generate import GenerationConfig, generate
from legolm.generation.memory_decode import MemoryDecoder, has_memory_layers
from legolm.generation.persistent import fused_step
from legolm.generation.slots import SlotDecoder
from legolm.model.lego import LegoLM
from legolm.model.transformer import TransformerLM
from legolm.serve.config import ServeConfig
from legolm.serve.job import Job
from legolm.serve.metrics import Metrics
from legolm.serve.sampler import Choice, SamplingParams, pick

State = dict[str, Tensor]


class Backend(ABC):
    """The decoder behind the engine (see the module docstring).

    Attributes:
        name: Shown by /health and the startup line.
        device: Where the model runs (requests' sampling generators live there).
        capacity: Requests it runs at once.
        context: Most prompt + completion tokens of one request.
        sessions: Whether it keeps memory sessions (memory-layer models).
        greedy_only: Whether it decodes greedily only (a request that omits temperature gets 0).
    """

    name: str
    device: torch.device
    capacity: int
    context: int
    sessions: bool = False
    greedy_only: bool = False

    def check(self, job: Job) -> None:
        """Refuse (`LegolmError`) a request this backend cannot run; called before it is queued."""
        return None

    @abstractmethod
    def admit(self, job: Job) -> Choice:
        """Prefill ``job``'s prompt; its first token."""

    @abstractmethod
    def step(self, jobs: Sequence[Job]) -> list[Choice]:
        """Feed each job's last token; the next token of each."""

    @abstractmethod
    def release(self, job: Job) -> None:
        """Free what ``job`` held (it finished, failed or was cancelled)."""

    def final_memory(self, job: Job) -> State | None:
        """The memory ``job`` leaves for its session (prompt and completion), on the CPU; None without one."""
        return None


def _pick(logits: Tensor, jobs: Sequence[Job]) -> list[Choice]:
    return pick(logits, [j.params for j in jobs], [j.generator for j in jobs])


class SlotBackend(Backend):
    """Continuous batching over a `SlotDecoder`; a request takes the lowest free row."""

    name = "batched"

    def __init__(self, model: TransformerLM, config: ServeConfig, context: int) -> None:
        self.capacity, self.context = config.max_batch, context
        self.decoder = SlotDecoder(model, config.max_batch, context, config.context_bucket, config.cuda_graph)
        self.device = self.decoder.device
        self.free = list(range(config.max_batch))
        self.rows: dict[int, int] = {}

    def admit(self, job: Job) -> Choice:
        row = heapq.heappop(self.free)
        self.rows[job.id] = row
        return _pick(self.decoder.prefill(row, job.prompt)[None], [job])[0]

    def step(self, jobs: Sequence[Job]) -> list[Choice]:
        n = max(self.rows[j.id] for j in jobs) + 1
        tokens, slots = [0] * n, [0] * n
        for j in jobs:
            tokens[self.rows[j.id]], slots[self.rows[j.id]] = j.last, j.slot
        logits = self.decoder.step(tokens, slots)
        return _pick(logits[[self.rows[j.id] for j in jobs]], jobs)

    def release(self, job: Job) -> None:
        row = self.rows.pop(job.id, None)
        if row is not None:
            heapq.heappush(self.free, row)


class MemoryBackend(Backend):
    """Memory-layer models: a `MemoryDecoder` per request, starting from its session's memory."""

    name = "memory"
    sessions = True

    def __init__(self, model: TransformerLM, config: ServeConfig, context: int) -> None:
        self.model, self.capacity, self.context = model, config.max_batch, context
        self.device = next(model.parameters()).device
        self.decoders: dict[int, MemoryDecoder] = {}

    def admit(self, job: Job) -> Choice:
        dec = MemoryDecoder(self.model, len(job.prompt) + job.max_tokens, job.memory)
        self.decoders[job.id] = dec
        return _pick(dec.feed(self._ids(job.prompt)), [job])[0]

    def step(self, jobs: Sequence[Job]) -> list[Choice]:
        logits = torch.cat([self.decoders[j.id].feed(self._ids([j.last])) for j in jobs])
        return _pick(logits, jobs)

    def release(self, job: Job) -> None:
        self.decoders.pop(job.id, None)

    def final_memory(self, job: Job) -> State | None:
        dec = self.decoders[job.id]
        dec.feed(self._ids([job.last]))  # the last token belongs to the conversation too
        return {k: v.cpu() for k, v in dec.memory_state().items()}

    def _ids(self, ids: Sequence[int]) -> Tensor:
        return torch.tensor([list(ids)], dtype=torch.long, device=self.device)


class FusedBackend(Backend):
    """``--fused``: fused batch-1 decode sessions (made once, reused by later requests), stepped in turn."""

    name = "fused"

    def __init__(self, model: TransformerLM, config: ServeConfig, context: int) -> None:
        device = next(model.parameters()).device
        check_fused(1, device)
        self.capacity, self.context, self.device = config.max_batch, context, device

        def session() -> DecodeSession:
            step = fused_step(model, config.fused_kernel, config.fused_persistent, config.fused_attention_block,
                              config.fused_embed_block, config.fused_tune, config.fused_pdl)
            return DecodeSession(model, 1, context, greedy=False, eos_id=None,
                                 cuda_graph=config.cuda_graph and device.type == "cuda", step=step)

        self.pool = [session() for _ in range(config.max_batch)]
        self.running: dict[int, DecodeSession] = {}

    def admit(self, job: Job) -> Choice:
        session = self.pool.pop()
        self.running[job.id] = session
        P = len(job.prompt)
        lengths = torch.tensor([P], device=self.device)
        logits = session.prefill(torch.tensor([job.prompt], device=self.device), lengths)
        choice = _pick(logits, [job])[0]
        session.start(torch.tensor([choice.token], device=self.device), P, lengths)
        return choice

    def step(self, jobs: Sequence[Job]) -> list[Choice]:
        choices = []
        for j in jobs:
            session = self.running[j.id]
            choice = _pick(session.step(), [j])[0]
            session.emit(torch.tensor([choice.token], device=self.device))
            choices.append(choice)
        return choices

    def release(self, job: Job) -> None:
        session = self.running.pop(job.id, None)
        if session is not None:
            self.pool.append(session)


@dataclass
class _Planned:
    tokens: list[int]
    given: int = 0


class LegoBackend(Backend):
    """LEGO early exit: a request is decoded whole at admission, then handed out a token per step."""

    name = "lego"

    def __init__(self, model: LegoLM, config: ServeConfig, context: int, eos_id: int | None,
                 metrics: Metrics) -> None:
        self.model, self.config, self.eos_id, self.metrics = model, config, eos_id, metrics
        self.device = next(model.parameters()).device
        self.capacity, self.context = config.max_batch, context
        self.planned: dict[int, _Planned] = {}
        self.greedy_only = config.fused or config.early_exit == "speculative"
        self._generation(1, SamplingParams(), stop_at_eos=True).validate()  # the server's settings, checked once

    def _generation(self, max_new: int, p: SamplingParams, stop_at_eos: bool) -> GenerationConfig:
        c = self.config
        return GenerationConfig(
            max_new_tokens=max_new, greedy=p.greedy, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
            seed=p.seed, stop_at_eos=stop_at_eos, early_exit=c.early_exit, threshold=c.threshold,
            target_ratio=c.target_ratio, kv_mode=c.kv_mode, draft_tokens=c.draft_tokens, fused=c.fused,
            cuda_graph=c.cuda_graph, fused_attention_block=c.fused_attention_block,
            fused_embed_block=c.fused_embed_block, fused_tune=c.fused_tune, fused_pdl=c.fused_pdl,
            fused_if_nodes=c.fused_if_nodes)

    def check(self, job: Job) -> None:
        if job.params.logprobs is not None:
            raise LegolmError("logprobs are not available with --early-exit (the early-exit decoders return tokens)")
        if not job.params.greedy and self.greedy_only:
            raise LegolmError(f"this server decodes greedily (--early-exit {self.config.early_exit}"
                              f"{' --fused' if self.config.fused else ''}): send temperature 0 or omit it")

    def admit(self, job: Job) -> Choice:
        config = self._generation(job.max_tokens, job.params, stop_at_eos=not job.ignore_eos)
        result = generate(self.model, [job.prompt], config, eos_id=self.eos_id)
        stats = result.early_exit
        if stats is not None:
            with self.metrics.lock:
                self.metrics.exit_tokens.inc(stats.shallow_count, "shallow")
                self.metrics.exit_tokens.inc(stats.deep_count, "deep")
        self.planned[job.id] = _Planned(result.tokens[0])
        return self._next(job)

    def step(self, jobs: Sequence[Job]) -> list[Choice]:
        return [self._next(j) for j in jobs]

    def _next(self, job: Job) -> Choice:
        plan = self.planned[job.id]
        plan.given += 1
        return Choice(plan.tokens[plan.given - 1])

    def release(self, job: Job) -> None:
        self.planned.pop(job.id, None)


def make_backend(model: TransformerLM, config: ServeConfig, eos_id: int | None, metrics: Metrics) -> Backend:
    """The backend for this model and these settings (see the module docstring).

    Raises:
        ConfigError: Settings the model cannot be served with (early exit without a LEGO exit, fused
            memory layers, ...).
    """
    context = min(config.max_context, model.config.block_size)
    if config.early_exit != "none":
        if not isinstance(model, LegoLM) or not model.extended:
            raise ConfigError(f"--early-exit {config.early_exit} needs a LEGO model with a shallow exit (the model/ "
                              f"directory `legolm lego` writes); this {type(model).__name__} has none")
        return LegoBackend(model, config, context, eos_id, metrics)
    if has_memory_layers(model):
        if config.fused:
            raise ConfigError("memory-layer models decode through their segment caches: drop --fused")
        return MemoryBackend(model, config, context)
    if config.fused:
        return FusedBackend(model, config, context)
    return SlotBackend(model, config, context)

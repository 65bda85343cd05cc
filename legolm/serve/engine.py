"""The engine: one thread that owns the model and runs every request through a `Backend`.

HTTP handlers `submit` jobs; between two decode steps the engine admits waiting ones (prefill,
first token) while rows are free and the prefill budget lasts, then runs one step for all running
requests, sends each its token, and retires the finished ones (EOS, a stop string, max_tokens, or
a client that left), whose rows the next admission reuses::

    submit ─▶ inbox ─▶ waiting ─ admit (prefill) ─▶ running ─ step ─▶ token events ─▶ handler
                                                      ▲          │
                                                      └─ finish: EOS / stop / length / cancelled ─▶ row freed

An exception inside the backend fails the requests it touched (HTTP 500 for them) and frees their
rows; the engine itself keeps running.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence

import torch

from legolm.data.tokenizer import Tokenizer
from legolm.errors import LegolmError
from legolm.serve.backends import Backend
from legolm.serve.config import ServeConfig
from legolm.serve.job import DoneEvent, ErrorEvent, Job, TokenEvent
from legolm.serve.metrics import Metrics
from legolm.serve.sampler import Choice, make_generator
from legolm.serve.sessions import SessionStore, State
from legolm.serve.text import TextStream

log = logging.getLogger("legolm.serve")


class QueueFull(LegolmError):
    """Too many requests are waiting (HTTP 429)."""


class EngineDown(LegolmError):
    """The engine thread is not running (HTTP 503)."""


class Engine:
    """Runs jobs on ``backend`` in its own thread (see the module docstring).

    Args:
        backend: The decoder.
        tokenizer: Decodes tokens for stop strings.
        eos_id: Ends a request (unless it ignores EOS); None = never.
        config: Queue size, prefill budget, poll interval.
        metrics: Where tokens, latencies and occupancy are counted.
        sessions: Memory sessions (memory-layer models), else None.
    """

    def __init__(self, backend: Backend, tokenizer: Tokenizer, eos_id: int | None, config: ServeConfig,
                 metrics: Metrics, sessions: SessionStore | None = None) -> None:
        self.backend, self.tokenizer, self.eos_id, self.config = backend, tokenizer, eos_id, config
        self.metrics, self.sessions = metrics, sessions
        self._inbox: queue.Queue[Job] = queue.Queue()
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="legolm-engine", daemon=True)
        self.failure: str | None = None

    # -- the handlers' side --------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job``; its events go to ``job.deliver``.

        Raises:
            EngineDown: The engine thread failed or was stopped.
            QueueFull: ``max_queue`` requests are already waiting.
            LegolmError: The backend cannot run this request (the handler answers 400).
        """
        if self.failure is not None or self._stopping.is_set():
            raise EngineDown(f"the engine is not running ({self.failure or 'stopped'}); see the server log")
        self.backend.check(job)
        if self._inbox.qsize() + len(self._waiting) >= self.config.max_queue:
            raise QueueFull(f"{self.config.max_queue} requests are already waiting; retry later")
        self._inbox.put(job)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return self._inbox.qsize() + len(self._waiting)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish the current step and end the thread (running requests are left unanswered)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    # -- the engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            with torch.inference_mode():  # grad mode is per thread
                self._serve()
        except BaseException as err:  # a bug in the engine itself: /health turns 503, requests fail
            self.failure = f"{type(err).__name__}: {err}"
            log.exception("legolm serve: the engine stopped")
            for job in [*self._running, *self._waiting]:
                job.deliver(ErrorEvent(f"the engine stopped ({self.failure})"))

    def _serve(self) -> None:
        while not self._stopping.is_set():
            self.run_once(block=True)

    def run_once(self, block: bool = False) -> None:
        """One turn of the loop: take new jobs (with ``block``, waiting up to engine_poll_s when idle), drop
        cancelled ones, admit waiting ones, and run one decode step. The engine thread repeats it; tests
        may call it themselves on an engine that was not started."""
        self._collect(block=block and not self._running and not self._waiting)
        self._drop_cancelled()
        self._admit()
        if self._running:
            self._step()

    def _collect(self, block: bool) -> None:
        """Move submitted jobs to the waiting line (waiting up to engine_poll_s for one when idle)."""
        try:
            if block:
                self._waiting.append(self._inbox.get(timeout=self.config.engine_poll_s))
            while True:
                self._waiting.append(self._inbox.get_nowait())
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._waiting if j.cancelled.is_set()]:
            self._waiting.remove(job)
            self._release_session(job, None)
            self._count_cancelled()
        for job in [j for j in self._running if j.cancelled.is_set()]:
            self._retire(job)
            self._count_cancelled()

    def _count_cancelled(self) -> None:
        with self.metrics.lock:
            self.metrics.cancelled.inc()

    def _admit(self) -> None:
        """Prefill waiting jobs while rows are free and the step's prompt-token budget lasts."""
        budget, admitted = self.config.prefill_tokens_per_step, 0
        while self._waiting and len(self._running) < self.backend.capacity:
            job = self._waiting[0]
            if admitted and len(job.prompt) > budget:
                return
            self._waiting.popleft()
            budget, admitted = budget - len(job.prompt), admitted + 1
            self._start(job)

    def _start(self, job: Job) -> None:
        self._running.append(job)
        try:
            job.generator = make_generator(job.params, self.backend.device)
            job.text = TextStream(self.tokenizer, job.stop) if job.stop else None
            choice = self.backend.admit(job)
        except Exception as err:
            self._fail([job], err)
            return
        with self.metrics.lock:
            self.metrics.prompt_tokens.inc(len(job.prompt))
        self._accept(job, choice)

    def _step(self) -> None:
        jobs = list(self._running)
        try:
            choices = self.backend.step(jobs)
        except Exception as err:
            self._fail(jobs, err)
            return
        with self.metrics.lock:
            self.metrics.occupancy.observe(len(jobs))
        for job, choice in zip(jobs, choices, strict=True):
            self._accept(job, choice)

    def _accept(self, job: Job, choice: Choice) -> None:
        """Record and send a job's new token; retire the job if it is done (fail it if that goes wrong)."""
        try:
            self._record(job, choice)
        except Exception as err:
            self._fail([job], err)

    def _record(self, job: Job, choice: Choice) -> None:
        now = time.perf_counter()
        with self.metrics.lock:
            self.metrics.completion_tokens.inc()
            if job.last_token_at is None:
                self.metrics.ttft.observe(now - job.arrived)
            else:
                self.metrics.token_gap.observe(now - job.last_token_at)
        job.last_token_at = now
        job.tokens.append(choice.token)
        job.deliver(TokenEvent(choice))
        reason = self._finish_reason(job, choice.token)
        if reason is not None:
            self._finish(job, reason)

    def _finish_reason(self, job: Job, token: int) -> str | None:
        if token == self.eos_id and not job.ignore_eos:
            return "stop"
        if job.text is not None and job.text.push(token):
            return "stop"
        return "length" if len(job.tokens) >= job.max_tokens else None

    def _finish(self, job: Job, reason: str) -> None:
        try:
            memory = self.backend.final_memory(job) if job.session is not None else None
        except Exception as err:
            self._fail([job], err)
            return
        self._retire(job, memory)
        with self.metrics.lock:
            self.metrics.latency.observe(time.perf_counter() - job.arrived)
        job.deliver(DoneEvent(reason, len(job.prompt), len(job.tokens)))

    def _retire(self, job: Job, memory: State | None = None) -> None:
        """Take ``job`` out of the batch: free its row and its session (storing ``memory`` there)."""
        if job in self._running:
            self._running.remove(job)
        self.backend.release(job)
        self._release_session(job, memory)

    def _release_session(self, job: Job, memory: State | None) -> None:
        if job.session is not None and self.sessions is not None:
            self.sessions.release(job.session, memory)

    def _fail(self, jobs: Sequence[Job], err: Exception) -> None:
        log.error("legolm serve: %d request(s) failed: %s: %s", len(jobs), type(err).__name__, err,
                  exc_info=not isinstance(err, LegolmError))
        for job in jobs:
            self._retire(job)
            job.deliver(ErrorEvent(f"generation failed ({type(err).__name__}: {err})"))

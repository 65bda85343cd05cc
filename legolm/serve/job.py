"""One generation request as the engine sees it, and the events it sends back to the HTTP handler."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from legolm.serve.sampler import Choice, SamplingParams
from legolm.serve.text import TextStream

_ids = itertools.count()


@dataclass
class TokenEvent:
    """A generated token."""

    choice: Choice


@dataclass
class DoneEvent:
    """The request finished: ``reason`` is stop (EOS or a stop string) or length (max_tokens)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class ErrorEvent:
    """The request failed inside the engine (an HTTP 500)."""

    message: str


Event = TokenEvent | DoneEvent | ErrorEvent


@dataclass
class Job:
    """A request: what to generate, where to send the events, and the engine's progress on it.

    Attributes:
        prompt: Prompt token ids.
        max_tokens: Tokens to generate at most.
        params: Sampling settings.
        deliver: Called (from the engine thread) with each event; must not block.
        stop: Stop strings (the text ends before the first one found).
        ignore_eos: Keep generating after the EOS token.
        session: Memory session to start from and update (memory-layer models).
        memory: The session's memory at admission (set by the engine).
        id: Unique id (backends key their per-request state by it).
        cancelled: Set by the handler when the client left: the engine frees the request's row.
        tokens: Generated so far.
        generator: The request's sampling generator.
        text: Decodes the tokens to find stop strings (requests with stop strings).
        arrived: perf_counter() at submission.
        last_token_at: perf_counter() at the last token.
    """

    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    deliver: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    session: str | None = None
    memory: dict[str, Tensor] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    text: TextStream | None = None
    arrived: float = field(default_factory=time.perf_counter)
    last_token_at: float | None = None

    @property
    def last(self) -> int:
        """The token the next step feeds."""
        return self.tokens[-1]

    @property
    def slot(self) -> int:
        """Position of the token the next step feeds."""
        return len(self.prompt) + len(self.tokens) - 1

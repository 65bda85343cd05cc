"""Prometheus text metrics of the server (``GET /metrics``), without a client library.

Counters (requests by endpoint and status, prompt and completion tokens, cancelled requests,
early-exit tokens), histograms (request latency, time to first token, time between tokens, batch
occupancy per decode step) and gauges read when scraped (running and waiting requests, capacity,
sessions). The exposition format is version 0.0.4 of Prometheus' text format.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "legolm_"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)  # seconds


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{v}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


class Counter:
    """A monotone count per label set."""

    def __init__(self, name: str, help_: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = PREFIX + name, help_, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        if not self.values and not self.labels:
            lines.append(f"{self.name} 0")
        lines += [f"{self.name}{_labels(self.labels, k)} {v:g}" for k, v in sorted(self.values.items())]
        return lines


class Histogram:
    """Observations counted into cumulative buckets, with their sum."""

    def __init__(self, name: str, help_: str, buckets: Sequence[float]) -> None:
        self.name, self.help, self.buckets = PREFIX + name, help_, tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for le, n in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
            running += n
            lines.append(f'{self.name}_bucket{{le="{le}"}} {running}')
        return [*lines, f"{self.name}_sum {self.sum:g}", f"{self.name}_count {running}"]


class Gauge:
    """A value read when the metrics are scraped (``kind`` counter: one kept elsewhere that only grows)."""

    def __init__(self, name: str, help_: str, read: Callable[[], float], kind: str = "gauge") -> None:
        self.name, self.help, self.read, self.kind = PREFIX + name, help_, read, kind

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", f"{self.name} {self.read():g}"]


class Metrics:
    """Every metric of the server; updated from the engine thread and the HTTP handlers (one lock).

    Args:
        capacity: Rows of the batch (the occupancy histogram's buckets are 1..capacity).
    """

    def __init__(self, capacity: int) -> None:
        self.lock = threading.Lock()
        self.requests = Counter("requests_total", "HTTP requests answered, by endpoint and status code.",
                                ("endpoint", "status"))
        self.prompt_tokens = Counter("prompt_tokens_total", "Prompt tokens prefilled.")
        self.completion_tokens = Counter("completion_tokens_total", "Tokens generated.")
        self.cancelled = Counter("cancelled_requests_total", "Requests whose client left before they finished.")
        self.exit_tokens = Counter("early_exit_tokens_total", "LEGO decoding: tokens by the exit that chose them.",
                                   ("exit",))
        self.latency = Histogram("request_duration_seconds", "Generation requests, arrival to last token.",
                                 LATENCY_BUCKETS)
        self.ttft = Histogram("time_to_first_token_seconds", "Arrival to the first generated token.",
                              LATENCY_BUCKETS)
        self.token_gap = Histogram("inter_token_latency_seconds", "Time between two tokens of one request.",
                                   TOKEN_GAP_BUCKETS)
        self.occupancy = Histogram("batch_occupancy", "Requests in each decode step.",
                                   [float(n) for n in range(1, capacity + 1)])
        self.gauges: list[Gauge] = []

    def gauge(self, name: str, help_: str, read: Callable[[], float], kind: str = "gauge") -> None:
        """Add a value read at scrape time."""
        self.gauges.append(Gauge(name, help_, read, kind))

    def render(self) -> str:
        with self.lock:
            parts: list[Counter | Histogram] = [
                self.requests, self.prompt_tokens, self.completion_tokens, self.cancelled, self.exit_tokens,
                self.latency, self.ttft, self.token_gap, self.occupancy]
            lines = [line for m in parts for line in m.render()]
        lines += [line for g in self.gauges for line in g.render()]
        return "\n".join(lines) + "\n"

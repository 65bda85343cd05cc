"""The server's parts in process: the continuous-batching decoder against full forward passes, per-row
sampling, incremental text with stop strings, the engine (sessions, cancellation, failures) driven
step by step, and the HTTP 409 of a busy session."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
import torch

from legolm.core.config import ModelConfig
from legolm.data.tokenizer import Tokenizer, train_bpe
from legolm.generation.slots import SlotDecoder, row_bucket
from legolm.layers.memory_state import ModelFingerprint, carry_memory, get_memory_state, memory_state_to_bytes
from legolm.model.transformer import TransformerLM
from legolm.serve.app import ServerState, create_app
from legolm.serve.backends import Backend, make_backend
from legolm.serve.config import ServeConfig
from legolm.serve.engine import Engine
from legolm.serve.job import DoneEvent, ErrorEvent, Event, Job, TokenEvent
from legolm.serve.metrics import Metrics
from legolm.serve.sampler import Choice, SamplingParams, make_generator, pick
from legolm.serve.sessions import SessionBusy, SessionStore
from legolm.serve.text import TextStream
from tests.test_memory_decode import memory_model

VOCAB = 97


# -- the continuous-batching decoder -----------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-pythia"])
def test_rows_join_and_leave_with_the_logits_of_full_forward_passes(preset: str) -> None:
    """Three rows at different lengths step together; one leaves and its row is reused by a new sequence
    (over the old one's keys), another joins a free row: every logit equals model(whole sequence)."""
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig.from_name(preset, vocab_size=VOCAB)).eval()
    dec = SlotDecoder(model, rows=4, max_len=40, context_bucket=8)
    seqs = {0: [1, 2, 3, 4, 5], 2: [7, 8], 1: [9] * 11}
    logits = {r: dec.prefill(r, s) for r, s in seqs.items()}
    worst = 0.0
    for step in range(12):
        for r, seq in seqs.items():
            with torch.no_grad():
                want = model(torch.tensor([seq]))[0, -1]
            worst = max(worst, float((want - logits[r]).abs().max()))
            seq.append(int(want.argmax()))
        n = max(seqs) + 1
        out = dec.step([seqs[r][-1] if r in seqs else 0 for r in range(n)],
                       [len(seqs[r]) - 1 if r in seqs else 0 for r in range(n)])
        assert out.shape == (n, VOCAB)
        logits = {r: out[r] for r in seqs}
        if step == 5:
            seqs[1], logits[1] = [6], dec.prefill(1, [6])  # row 1 reused: its old keys must be masked
            seqs[3], logits[3] = [4, 4, 4], dec.prefill(3, [4, 4, 4])
    assert worst < 1e-4


def test_row_buckets_and_bad_steps() -> None:
    assert [row_bucket(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
    assert row_bucket(7, 6) == 6
    model = TransformerLM(ModelConfig.from_name("tiny-gpt2", vocab_size=VOCAB)).eval()
    dec = SlotDecoder(model, rows=2, max_len=8, context_bucket=4)
    with pytest.raises(Exception, match="slots < 8"):
        dec.step([1], [8])
    with pytest.raises(Exception, match="context"):
        SlotDecoder(model, rows=2, max_len=model.config.block_size + 1, context_bucket=4)


# -- sampling per row -------------------------------------------------------------------------------------
def test_each_row_samples_with_its_own_settings_and_seed() -> None:
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    seeded = SamplingParams(greedy=False, temperature=0.8, seed=5)
    rows = [SamplingParams(logprobs=3), seeded, SamplingParams(greedy=False, top_k=1)]
    first = pick(logits, rows, [make_generator(p, torch.device("cpu")) for p in rows])
    alone = pick(logits[1:2], [seeded], [make_generator(seeded, torch.device("cpu"))])
    assert first[0].token == int(logits[0].argmax()) and first[2].token == int(logits[2].argmax())
    assert first[1].token == alone[0].token, "a seeded row draws the same beside other rows as alone"
    lp = logits[0].log_softmax(-1)
    assert first[0].logprob == pytest.approx(float(lp.max()))
    assert first[0].top is not None and [t for t, _ in first[0].top] == lp.topk(3).indices.tolist()
    assert first[1].logprob is None and first[1].top is None


def test_unseeded_rows_are_sampled_together_with_their_own_settings() -> None:
    """One batched draw: each row keeps only its own top-k / nucleus, and frequencies follow its softmax."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]] * 4)
    rows = [SamplingParams(greedy=False, top_k=2), SamplingParams(greedy=False, top_p=0.5),
            SamplingParams(greedy=False, temperature=0.5), SamplingParams(greedy=True)]
    draws = torch.tensor([[c.token for c in pick(logits, rows, [None] * 4)] for _ in range(3000)])
    assert set(draws[:, 0].tolist()) == {0, 1}
    assert set(draws[:, 1].tolist()) == {0}, "the best token alone holds more than half the mass"
    assert set(draws[:, 3].tolist()) == {0}
    want = (logits[0] / 0.5).softmax(-1)
    freq = torch.bincount(draws[:, 2], minlength=4).float() / len(draws)
    assert torch.allclose(freq, want, atol=0.03), (freq, want)
    top2 = logits[0, :2].softmax(-1)
    assert abs(float((draws[:, 0] == 0).float().mean()) - float(top2[0])) < 0.03


# -- text ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_tokenizer(gpt2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(gpt2_tokenizer_dir)


def _stream(tok: Tokenizer, text: str, stops: Sequence[str]) -> tuple[list[str], TextStream, int]:
    """Feed ``text``'s tokens one by one; the chunks handed out, the stream, and the tokens fed."""
    ts, chunks, fed = TextStream(tok, stops), [], 0
    for t in tok.encode(text):
        fed += 1
        stopped = ts.push(t)
        chunks.append(ts.ready(finished=False))
        if stopped:
            break
    chunks.append(ts.ready(finished=True))
    return chunks, ts, fed


def test_text_streams_in_whole_characters_and_never_leaks_a_stop_string(gpt2_tokenizer: Tokenizer) -> None:
    text = "Café au lait 🍵, then the END of it. More after."
    chunks, ts, _ = _stream(gpt2_tokenizer, text, [])
    assert "".join(chunks) == text == ts.final()
    assert not any("\ufffd" in c for c in chunks), "a character split across tokens is held until complete"
    chunks, ts, fed = _stream(gpt2_tokenizer, text, ["the END", "never"])
    assert "".join(chunks) == ts.final() == "Café au lait 🍵, then "
    assert not any("the" in c and "END" in c for c in chunks)
    assert fed < len(gpt2_tokenizer.encode(text)), "generation stops at the token completing the stop string"
    assert all("E" not in c for c in chunks), "no prefix of the stop string is ever sent"


# -- the engine, step by step --------------------------------------------------------------------------------
class _Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def tokens(self) -> list[int]:
        return [e.choice.token for e in self.events if isinstance(e, TokenEvent)]

    def end(self) -> Event | None:
        return next((e for e in self.events if not isinstance(e, TokenEvent)), None)


def _memory_engine(max_batch: int = 2) -> tuple[Engine, SessionStore, TransformerLM, Tokenizer]:
    model = memory_model("infini")
    tok = train_bpe(["the cat sat on the mat. " * 30], 300)
    config = ServeConfig(max_batch=max_batch, max_context=model.config.block_size)
    metrics = Metrics(config.max_batch)
    sessions = SessionStore(config.max_sessions)
    backend = make_backend(model, config, None, metrics)
    return Engine(backend, tok, None, config, metrics, sessions), sessions, model, tok


def _job(prompt: list[int], n: int, session: str | None = None) -> tuple[Job, _Sink]:
    sink = _Sink()
    return Job(prompt, n, SamplingParams(), sink, session=session), sink


def test_a_session_is_held_while_its_request_runs_and_a_cancelled_one_stores_nothing() -> None:
    engine, sessions, model, _ = _memory_engine()
    prompt = [5, 6, 7, 8, 9]
    job, sink = _job(prompt, 12, session="s")
    job.memory = sessions.acquire("s")
    engine.submit(job)
    engine.run_once()
    assert engine.running == 1 and len(sink.tokens()) == 2  # the prefill's token and one step
    with pytest.raises(SessionBusy):
        sessions.acquire("s")
    job.cancelled.set()
    engine.run_once()
    assert engine.running == 0 and sink.end() is None and len(sessions) == 0
    job, sink = _job(prompt, 12, session="s")
    job.memory = sessions.acquire("s")  # free again
    engine.submit(job)
    while sink.end() is None:
        engine.run_once()
    assert isinstance(sink.end(), DoneEvent) and len(sink.tokens()) == 12
    with torch.no_grad(), carry_memory(model):
        model(torch.tensor([prompt + sink.tokens()]))
        want = get_memory_state(model)
    stored = sessions.get("s")
    for name in want:
        torch.testing.assert_close(stored[name], want[name], atol=1e-4, rtol=1e-4)


class _FailingOnce(Backend):
    """Wraps a backend; its first step raises."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.failed = inner, False
        self.name, self.device, self.capacity, self.context = "failing", inner.device, inner.capacity, inner.context

    def admit(self, job: Job) -> Choice:
        return self.inner.admit(job)

    def step(self, jobs: Sequence[Job]) -> list[Choice]:
        if not self.failed:
            self.failed = True
            raise RuntimeError("boom")
        return self.inner.step(jobs)

    def release(self, job: Job) -> None:
        self.inner.release(job)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on() -> None:
    model = TransformerLM(ModelConfig.from_name("tiny-gpt2", vocab_size=VOCAB)).eval()
    tok = train_bpe(["a b c d e f g. " * 20], 257 + 20)
    config = ServeConfig(max_batch=2, max_context=32)
    metrics = Metrics(config.max_batch)
    backend = _FailingOnce(make_backend(model, config, None, metrics))
    engine = Engine(backend, tok, None, config, metrics)
    (first, s1), (second, s2) = _job([1, 2, 3], 5), _job([4, 5], 5)
    engine.submit(first)
    engine.submit(second)
    engine.run_once()
    assert all(isinstance(s.end(), ErrorEvent) and "boom" in s.end().message for s in (s1, s2))  # type: ignore[union-attr]
    assert engine.running == 0 and backend.inner.free == [0, 1]  # type: ignore[attr-defined]
    third, s3 = _job([1, 2, 3], 5)
    engine.submit(third)
    while s3.end() is None:
        engine.run_once()
    assert isinstance(s3.end(), DoneEvent) and len(s3.tokens()) == 5


class _Gated(Backend):
    """Wraps a backend; admitting a job waits until the test opens the gate."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.entered, self.gate = inner, threading.Event(), threading.Event()
        self.name, self.device, self.capacity, self.context = "gated", inner.device, inner.capacity, inner.context
        self.sessions = inner.sessions

    def admit(self, job: Job) -> Choice:
        self.entered.set()
        self.gate.wait()
        return self.inner.admit(job)

    def step(self, jobs: Sequence[Job]) -> list[Choice]:
        return self.inner.step(jobs)

    def release(self, job: Job) -> None:
        self.inner.release(job)

    def final_memory(self, job: Job) -> dict[str, torch.Tensor] | None:
        return self.inner.final_memory(job)


def test_a_busy_session_is_http_409_and_a_stopped_engine_503() -> None:
    """In process over ASGI: while the first request of a session is being admitted (held at a gate), a second
    request and an upload to that session get 409 with OpenAI's error body; it then completes; a request to
    a stopped engine gets 503."""
    engine, sessions, model, tok = _memory_engine()
    gated = _Gated(engine.backend)
    engine.backend = gated
    fingerprint = ModelFingerprint.of(model)
    state = ServerState("m", model, tok, engine, engine.config, engine.metrics, None, sessions, fingerprint, 0)
    app = create_app(state)
    with torch.no_grad(), carry_memory(model):
        model(torch.tensor([[1, 2, 3]]))
    valid = memory_state_to_bytes(get_memory_state(model), fingerprint)
    body = {"model": "m", "prompt": "the cat", "max_tokens": 4, "session": "s"}

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            first = asyncio.create_task(client.post("/v1/completions", json=body))
            while not gated.entered.is_set():
                await asyncio.sleep(0.01)
            second = await client.post("/v1/completions", json=body)
            upload = await client.put("/v1/sessions/s/memory", content=valid)
            gated.gate.set()
            done = await first
            engine.stop()
            down = await client.post("/v1/completions", json={**body, "session": None})
            return [second, upload, done, down]

    engine.start()
    try:
        second, upload, done, down = asyncio.run(scenario())
    finally:
        gated.gate.set()
        engine.stop()
    assert second.status_code == 409 and second.json()["error"]["code"] == "session_busy"
    assert upload.status_code == 409
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4 and len(sessions) == 1
    assert down.status_code == 503 and down.json()["error"]["code"] == "engine_down"

"""The HTTP routes (FastAPI): OpenAI's completions, chat completions and models, plus health, metrics and
memory sessions.

::

    POST /v1/completions            prompt -> text (stream: server-sent events)
    POST /v1/chat/completions       messages -> chat template -> text
    GET  /v1/models                 the served model
    GET  /health                    200 while the engine runs (running / waiting / free rows), else 503
    GET  /metrics                   Prometheus text
    GET|PUT|DELETE /v1/sessions/{id}/memory    a memory session's state file (memory-layer models)

Every error is OpenAI's JSON body with a 4xx code for the client's mistakes (400 bad request, 404
unknown model or session, 409 session in use, 429 queue full) and 500 for a failure inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from legolm.data.tokenizer import Tokenizer
from legolm.errors import CheckpointError, ConfigError, LegolmError
from legolm.layers.memory_state import ModelFingerprint, memory_state_from_bytes, memory_state_to_bytes
from legolm.model.transformer import TransformerLM
from legolm.serve.chat import ChatTemplate
from legolm.serve.config import ServeConfig
from legolm.serve.engine import Engine, EngineDown, QueueFull
from legolm.serve.job import DoneEvent, ErrorEvent, Event, Job, TokenEvent
from legolm.serve.metrics import CONTENT_TYPE, Metrics
from legolm.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    GenerationRequest,
    chat_choice,
    chat_delta,
    completion_choice,
    envelope,
    new_id,
    usage,
    validation_error,
)
from legolm.serve.sampler import Choice, SamplingParams
from legolm.serve.sessions import SessionBusy, SessionStore, UnknownSession
from legolm.serve.text import TextStream

CLIENT_CLOSED = 499  # nginx's code for a request whose client left; logged and counted, never sent


@dataclass
class ServerState:
    """What the routes need.

    Attributes:
        model_id: The id clients send as ``model``.
        model: The model (memory uploads are checked against its layers).
        tokenizer: Encodes prompts, decodes completions.
        engine: Runs the requests.
        config: The server's settings.
        metrics: Prometheus metrics.
        template: The chat template (None: chat requests are refused).
        sessions: Memory sessions (memory-layer models), else None.
        fingerprint: The model's fingerprints for memory files (memory-layer models), else None.
        created: Unix time the server started.
    """

    model_id: str
    model: TransformerLM
    tokenizer: Tokenizer
    engine: Engine
    config: ServeConfig
    metrics: Metrics
    template: ChatTemplate | None
    sessions: SessionStore | None
    fingerprint: ModelFingerprint | None
    created: int

    @property
    def context(self) -> int:
        return self.engine.backend.context


# -- one generation request ----------------------------------------------------------------------------
class Run:
    """A request between its handler and the engine: the job, its event queue and its text."""

    def __init__(self, state: ServerState, prompt: list[int], max_tokens: int, params: SamplingParams,
                 req: GenerationRequest) -> None:
        self.state = state
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # a closed event loop: the server is shutting down
                loop.call_soon_threadsafe(self.events.put_nowait, event)

        self.job = Job(prompt, max_tokens, params, deliver, req.stops(), req.ignore_eos, req.session)
        self.text = TextStream(state.tokenizer, req.stops())
        self.choices: list[Choice] = []

    def submit(self) -> None:
        """Reserve the session (if any) and queue the job; `ApiError` when either is refused."""
        state, job = self.state, self.job
        if job.session is not None:
            if state.sessions is None:
                raise ApiError(400, "this model has no memory layers: it keeps no memory sessions", param="session")
            try:
                job.memory = state.sessions.acquire(job.session)
            except SessionBusy as err:
                raise ApiError(409, str(err), param="session", code="session_busy") from None
        try:
            state.engine.submit(job)
        except LegolmError as err:
            if job.session is not None and state.sessions is not None:
                state.sessions.release(job.session, None)
            raise submit_error(err) from None

    async def next(self) -> Event:
        return await self.events.get()

    async def collect(self, request: Request) -> DoneEvent | ErrorEvent | None:
        """Wait for the end (None when the client left first: the job is cancelled)."""
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), timeout=self.state.config.disconnect_poll_s)
            except TimeoutError:
                if await request.is_disconnected():
                    self.job.cancelled.set()
                    return None
                continue
            if isinstance(event, TokenEvent):
                self.choices.append(event.choice)
                self.text.push(event.choice.token)
            else:
                return event


def submit_error(err: LegolmError) -> ApiError:
    """429 for a full queue, 503 for a stopped engine, else 400 (the backend cannot run the request)."""
    if isinstance(err, QueueFull):
        return ApiError(429, str(err), code="queue_full")
    if isinstance(err, EngineDown):
        return ApiError(503, str(err), kind="server_error", code="engine_down")
    return ApiError(400, str(err))


# -- request parsing -------------------------------------------------------------------------------------
async def parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def check_request(state: ServerState, req: GenerationRequest) -> None:
    if req.model != state.model_id:
        raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {state.model_id!r}",
                       param="model", code="model_not_found")
    problem = req.unsupported()
    if problem is not None:
        raise problem
    stops = req.stops()
    if len(stops) > state.config.max_stop or any(not s for s in stops):
        raise ApiError(400, f"stop takes at most {state.config.max_stop} non-empty strings", param="stop")


def sampling(state: ServerState, req: GenerationRequest, logprobs: int | None) -> SamplingParams:
    default = 0.0 if state.engine.backend.greedy_only else state.config.default_temperature
    temperature = req.temperature if req.temperature is not None else default
    if logprobs is not None and logprobs > state.config.max_logprobs:
        raise ApiError(400, f"at most {state.config.max_logprobs} logprobs per token", param="logprobs")
    return SamplingParams(greedy=temperature == 0, temperature=temperature or 1.0, top_k=max(req.top_k or 0, 0),
                          top_p=req.top_p if req.top_p is not None else 1.0, seed=req.seed, logprobs=logprobs)


def budget(state: ServerState, prompt: list[int], asked: int | None, default: int | None) -> int:
    """max_tokens for this prompt: what the request asked, else ``default`` (None: the rest of the context)."""
    context = state.context
    if len(prompt) >= context:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; this server's context is {context} tokens "
                            "(prompt + completion)", param="prompt", code="context_length_exceeded")
    if asked is None:
        return min(default, context - len(prompt)) if default is not None else context - len(prompt)
    if len(prompt) + asked > context:
        raise ApiError(400, f"this server's context is {context} tokens, but {len(prompt) + asked} were asked for "
                            f"({len(prompt)} in the prompt, {asked} for the completion); lower max_tokens",
                       param="max_tokens", code="context_length_exceeded")
    return asked


def check_ids(state: ServerState, ids: list[int]) -> list[int]:
    vocab = state.model.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the model's vocabulary of {vocab}", param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty: give at least one token of text", param="prompt")
    return ids


def completion_prompt(state: ServerState, req: CompletionRequest) -> list[int]:
    """The prompt's ids: a text, a list of ids, or a list of one of them."""
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"one prompt per request, got {len(prompt)} (send them as separate requests)",
                           param="prompt")
        prompt = prompt[0]
    ids = state.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    return check_ids(state, ids)


def chat_prompt(state: ServerState, req: ChatRequest) -> list[int]:
    if state.template is None:
        raise ApiError(400, f"the model {state.model_id!r} has no chat template; use /v1/completions or start the "
                            "server with --chat-template FILE", param="messages")
    try:
        text = state.template.render([{"role": m.role, "content": m.text()} for m in req.messages])
    except LegolmError as err:
        raise ApiError(400, str(err), param="messages") from None
    ids = state.tokenizer.encode(text)
    bos = state.tokenizer.bos_id
    if len(ids) > 1 and ids[0] == ids[1] == bos:  # the template printed BOS and the tokenizer prepends it too
        ids = ids[1:]
    return check_ids(state, ids)


# -- logprobs ------------------------------------------------------------------------------------------
def _token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(tokenizer: Tokenizer, choices: list[Choice], offset: int) -> dict[str, Any]:
    texts = [_token_text(tokenizer, c.token) for c in choices]
    offsets = [offset + sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    top = [None if c.top is None else {_token_text(tokenizer, t): lp for t, lp in c.top} for c in choices]
    return {"tokens": texts, "token_logprobs": [c.logprob for c in choices], "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, choices: list[Choice]) -> dict[str, Any]:
    def entry(token: int, logprob: float | None) -> dict[str, Any]:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(c.token, c.logprob), "top_logprobs": [entry(t, lp) for t, lp in (c.top or [])]}
                        for c in choices]}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


STREAM_END = "data: [DONE]\n\n"


def failure(event: ErrorEvent) -> ApiError:
    return ApiError(500, event.message, kind="server_error")


# -- the routes ---------------------------------------------------------------------------------------
async def completions(state: ServerState, request: Request) -> Response:
    req: CompletionRequest = await parse(request, CompletionRequest)
    check_request(state, req)
    prompt = completion_prompt(state, req)
    max_tokens = budget(state, prompt, req.max_tokens, state.config.completion_max_tokens)
    run = Run(state, prompt, max_tokens, sampling(state, req, req.logprobs), req)
    run.submit()
    rid = new_id("cmpl")
    echo = state.tokenizer.decode(prompt) if req.echo else ""
    if req.stream:
        return StreamingResponse(_completion_stream(state, run, rid, echo, req), media_type="text/event-stream")
    end = await run.collect(request)
    if end is None:
        return Response(status_code=CLIENT_CLOSED)
    if isinstance(end, ErrorEvent):
        raise failure(end)
    logprobs = completion_logprobs(state.tokenizer, run.choices, len(echo)) if req.logprobs is not None else None
    choice = completion_choice(echo + run.text.final(), end.reason, logprobs)
    return JSONResponse(envelope("text_completion", rid, state.model_id, [choice],
                                 usage(end.prompt_tokens, end.completion_tokens)))


async def _completion_stream(state: ServerState, run: Run, rid: str, echo: str,
                             req: CompletionRequest) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None, lp: dict[str, Any] | None = None) -> str:
        return sse(envelope("text_completion", rid, state.model_id, [completion_choice(text, finish, lp)]))

    try:
        if echo:
            yield chunk(echo)
        while True:
            event = await run.next()
            if isinstance(event, TokenEvent):
                run.text.push(event.choice.token)
                lp = completion_logprobs(state.tokenizer, [event.choice], 0) if req.logprobs is not None else None
                text = run.text.ready(finished=False)
                if text or lp:
                    yield chunk(text, None, lp)
                continue
            if isinstance(event, ErrorEvent):
                yield sse(failure(event).body())
            else:
                yield chunk(run.text.ready(finished=True), event.reason)
                if req.include_usage():
                    yield sse(envelope("text_completion", rid, state.model_id, [],
                                       usage(event.prompt_tokens, event.completion_tokens)))
            yield STREAM_END
            return
    finally:
        run.job.cancelled.set()  # the client left mid-stream (or the stream ended): the row is freed


async def chat_completions(state: ServerState, request: Request) -> Response:
    req: ChatRequest = await parse(request, ChatRequest)
    check_request(state, req)
    prompt = chat_prompt(state, req)
    max_tokens = budget(state, prompt, req.max_completion_tokens or req.max_tokens, None)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    run = Run(state, prompt, max_tokens, sampling(state, req, logprobs), req)
    run.submit()
    rid = new_id("chatcmpl")
    if req.stream:
        return StreamingResponse(_chat_stream(state, run, rid, req), media_type="text/event-stream")
    end = await run.collect(request)
    if end is None:
        return Response(status_code=CLIENT_CLOSED)
    if isinstance(end, ErrorEvent):
        raise failure(end)
    lp = chat_logprobs(state.tokenizer, run.choices) if req.logprobs else None
    choice = chat_choice(run.text.final(), end.reason, lp)
    return JSONResponse(envelope("chat.completion", rid, state.model_id, [choice],
                                 usage(end.prompt_tokens, end.completion_tokens)))


async def _chat_stream(state: ServerState, run: Run, rid: str, req: ChatRequest) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, lp: dict[str, Any] | None = None) -> str:
        return sse(envelope("chat.completion.chunk", rid, state.model_id, [chat_delta(delta, finish, lp)]))

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await run.next()
            if isinstance(event, TokenEvent):
                run.text.push(event.choice.token)
                lp = chat_logprobs(state.tokenizer, [event.choice]) if req.logprobs else None
                text = run.text.ready(finished=False)
                if text or lp:
                    yield chunk({"content": text}, None, lp)
                continue
            if isinstance(event, ErrorEvent):
                yield sse(failure(event).body())
            else:
                rest = run.text.ready(finished=True)
                yield chunk({"content": rest} if rest else {}, event.reason)
                if req.include_usage():
                    yield sse(envelope("chat.completion.chunk", rid, state.model_id, [],
                                       usage(event.prompt_tokens, event.completion_tokens)))
            yield STREAM_END
            return
    finally:
        run.job.cancelled.set()


def models(state: ServerState) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": state.created,
                                        "owned_by": "legolm", "max_model_len": state.context}]}


def health(state: ServerState) -> JSONResponse:
    engine = state.engine
    body = {"status": "ok" if engine.alive else "error", "model": state.model_id, "backend": engine.backend.name,
            "running": engine.running, "waiting": engine.waiting, "capacity": engine.backend.capacity,
            "free": engine.backend.capacity - engine.running}
    if engine.failure:
        body["error"] = engine.failure
    return JSONResponse(body, status_code=200 if engine.alive else 503)


# -- memory sessions ---------------------------------------------------------------------------------------
def _store(state: ServerState) -> tuple[SessionStore, ModelFingerprint]:
    if state.sessions is None or state.fingerprint is None:
        raise ApiError(400, "this model has no memory layers: it keeps no memory sessions")
    return state.sessions, state.fingerprint


async def get_memory(state: ServerState, session: str) -> Response:
    store, fingerprint = _store(state)
    try:
        memory = store.get(session)
    except UnknownSession as err:
        raise ApiError(404, str(err), code="session_not_found") from None
    data = await run_in_threadpool(memory_state_to_bytes, memory, fingerprint)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{session}.memory.safetensors"'})


async def put_memory(state: ServerState, session: str, request: Request) -> dict[str, Any]:
    store, fingerprint = _store(state)
    data = await request.body()
    source = f"the uploaded memory of session {session!r}"
    try:
        memory = await run_in_threadpool(memory_state_from_bytes, state.model, data, fingerprint, source)
    except (CheckpointError, ConfigError) as err:
        raise ApiError(400, str(err), code="memory_state_mismatch") from None
    batch = {int(v.shape[0]) for k, v in memory.items() if k.endswith(".M")}
    if batch != {1}:
        raise ApiError(400, f"{source} holds {sorted(batch)} sequences; a session holds one",
                       code="memory_state_mismatch")
    try:
        store.put(session, memory)
    except SessionBusy as err:
        raise ApiError(409, str(err), code="session_busy") from None
    return {"object": "memory_session", "id": session, "tensor_bytes": sum(v.nbytes for v in memory.values())}


def delete_memory(state: ServerState, session: str) -> dict[str, Any]:
    store, _ = _store(state)
    try:
        store.delete(session)
    except UnknownSession as err:
        raise ApiError(404, str(err), code="session_not_found") from None
    except SessionBusy as err:
        raise ApiError(409, str(err), code="session_busy") from None
    return {"object": "memory_session", "id": session, "deleted": True}


# -- the app -----------------------------------------------------------------------------------------------
def create_app(state: ServerState) -> Any:
    """The ASGI app: the routes, OpenAI-style errors, and request counting; it starts and stops the engine."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(state.engine.stop)

    app = FastAPI(title="legolm", lifespan=lifespan)
    _routes(app, state)
    _error_handlers(app)
    return CountRequests(app, state.metrics)


def _routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def _completions(request: Request) -> Response:
        return await completions(state, request)

    @app.post("/v1/chat/completions")
    async def _chat(request: Request) -> Response:
        return await chat_completions(state, request)

    @app.get("/v1/models")
    async def _models() -> dict[str, Any]:
        return models(state)

    @app.get("/health")
    async def _health() -> JSONResponse:
        return health(state)

    @app.get("/metrics")
    async def _metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/sessions/{session}/memory")
    async def _get_memory(session: str) -> Response:
        return await get_memory(state, session)

    @app.put("/v1/sessions/{session}/memory")
    async def _put_memory(session: str, request: Request) -> dict[str, Any]:
        return await put_memory(state, session, request)

    @app.delete("/v1/sessions/{session}/memory")
    async def _delete_memory(session: str) -> dict[str, Any]:
        return delete_memory(state, session)


def _error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, ApiError)
        return JSONResponse(err.body(), status_code=err.status)

    async def http_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, HTTPException)
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(err.status_code, str(err.detail), kind).body(), status_code=err.status_code)

    async def unexpected(_: Request, err: Exception) -> JSONResponse:
        body = ApiError(500, f"internal error ({type(err).__name__}: {err})", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class CountRequests:
    """ASGI middleware: counts each response by endpoint and status (a pure ASGI wrapper: streams pass through)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope["path"])
        endpoint = path if path in ENDPOINTS else ("/v1/sessions/{id}/memory" if path.startswith("/v1/sessions/")
                                                   else "other")

        async def counted(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                with self.metrics.lock:
                    self.metrics.requests.inc(1.0, endpoint, str(message["status"]))
            await send(message)

        await self.app(scope, receive, counted)

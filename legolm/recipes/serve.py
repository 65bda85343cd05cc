"""`legolm serve` end to end: load the model, pick its backend, start the engine, listen for HTTP.

    legolm serve --model PATH_OR_NAME [--host 127.0.0.1 --port 8000] [--device cuda --dtype bfloat16]
                 [--max-batch 16] [--fused] [--early-exit threshold|speculative ...] [--chat-template FILE]

`build_server` makes the `ServerState` (model, tokenizer, chat template, backend, engine, metrics,
sessions); `run` binds the socket first (a busy port is one error line before anything loads
twice), prints where it listens, and runs uvicorn until interrupted.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from legolm.checkpoints.loader import load
from legolm.errors import ConfigError, LegolmError
from legolm.layers.memory_state import ModelFingerprint
from legolm.serve.app import ServerState, create_app
from legolm.serve.backends import make_backend
from legolm.serve.chat import load_chat_template
from legolm.serve.config import ServeConfig
from legolm.serve.engine import Engine
from legolm.serve.metrics import Metrics
from legolm.serve.sessions import SessionStore
from legolm.utils.device import device_and_dtype


def model_name(path_or_name: str) -> str:
    """The default model id: a file's stem, a directory's name, else the hub name as given."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path.stem
    return path.name if path.is_dir() else path_or_name


def build_server(config: ServeConfig) -> ServerState:
    """Everything the routes need for ``config.model``, the engine not yet started."""
    config.validate()
    device, dtype = device_and_dtype(config.device, config.dtype)
    model, tokenizer = load(config.model, device=device, dtype=dtype)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                          f"{model.config.vocab_size}: they do not belong together")
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else model.config.eos_token_id
    metrics = Metrics(config.max_batch)
    backend = make_backend(model, config, eos, metrics)
    sessions = SessionStore(config.max_sessions) if backend.sessions else None
    engine = Engine(backend, tokenizer, eos, config, metrics, sessions)
    _gauges(metrics, engine, sessions)
    return ServerState(
        model_id=config.served_model_name or model_name(config.model), model=model, tokenizer=tokenizer,
        engine=engine, config=config, metrics=metrics,
        template=load_chat_template(tokenizer, config.chat_template), sessions=sessions,
        fingerprint=ModelFingerprint.of(model) if sessions is not None else None, created=int(time.time()))


def _gauges(metrics: Metrics, engine: Engine, sessions: SessionStore | None) -> None:
    metrics.gauge("running_requests", "Requests being decoded.", lambda: engine.running)
    metrics.gauge("waiting_requests", "Requests waiting for a free row.", lambda: engine.waiting)
    metrics.gauge("batch_capacity", "Requests decoded at once at most.", lambda: engine.backend.capacity)
    if sessions is not None:
        metrics.gauge("memory_sessions", "Memory sessions stored.", lambda: len(sessions))
        metrics.gauge("memory_sessions_evicted_total", "Memory sessions dropped (least recently used).",
                      lambda: sessions.evicted, kind="counter")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (``port`` 0: any free one).

    Raises:
        LegolmError: The address is taken or cannot be used.
    """
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as err:
        raise LegolmError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port or --host") \
            from None
    sock.listen()
    sock.set_inheritable(True)
    return sock


def run(config: ServeConfig) -> None:
    """Serve ``config.model`` until interrupted (Ctrl-C / SIGTERM)."""
    try:
        import uvicorn
    except ImportError:
        raise LegolmError("legolm serve needs FastAPI and uvicorn: pip install 'legolm[serve]'") from None
    config.validate()
    sock = bind(config.host, config.port)
    state = build_server(config)
    host, port = sock.getsockname()[:2]
    backend = state.engine.backend
    print(f"legolm serve: {state.model_id} ({backend.name} decoder, {backend.capacity} at once, context "
          f"{backend.context}) on http://{host}:{port}/v1", flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(state), log_level=config.log_level, lifespan="on"))
    server.run(sockets=[sock])

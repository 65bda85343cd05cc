"""Serving under load: `legolm serve` against a server built on `transformers` ``generate``, same weights,
same GPU, same run, same streaming clients.

For each model (random weights of the real architecture, shared by both servers), C concurrent
clients (``--clients 1 8 32 64``) each stream ``--rounds`` completions of ``--new-tokens`` tokens
(EOS ignored) for prompts of ``--prompt-tokens`` real-text tokens (Tiny Shakespeare, sent as token
ids). Reported per server and C: generated tokens/s over the level's wall time, p50/p99 time to
first token (request sent -> first streamed token) and p50/p99 inter-token latency (gaps between
streamed chunks of one request).

- legolm: ``legolm serve`` in its own process (continuous batching over the static KV cache, a CUDA
  graph per step shape), ``--max-batch`` the largest C.
- peer: a FastAPI app in its own process (``--peer-server``, the same weights saved with
  ``save_pretrained``) that queues each request for one worker on the process's main thread, which
  runs ``model.generate`` (greedy, dynamic cache) and streams its tokens through a ``BaseStreamer``:
  what a server written around ``transformers`` does without a batching scheduler. (A thread per
  request measured ~9x slower per token on the H200 than ``generate`` on the main thread, so the
  peer does not use one.)

    python benchmarks/prepare_data.py                      # once, where the shared data is
    python -m benchmarks.serve --models gpt2 --clients 1 8 32 64
    python -m benchmarks.serve --smoke                     # CPU: a tiny model, 1 and 2 clients
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from benchmarks.common import BENCH_DATA, device_info, hf_random_model, legolm_copy, print_table, write_result
from legolm.checkpoints.native import save_checkpoint
from legolm.core.config import ModelConfig
from legolm.data.sources import shared_path
from legolm.data.tokenizer import Tokenizer
from legolm.model.transformer import TransformerLM
from legolm.recipes.serve import bind

GPT2_TOKENIZER = "tokenizers/gpt2"  # every preset here has GPT-2's vocabulary size or a smaller one
STARTUP_S = 600.0
MODEL_ID = "bench"


# -- the two servers ---------------------------------------------------------------------------------------
def build_pair(preset: str, device: str, dtype: torch.dtype, min_vocab: int) -> tuple[Any, TransformerLM]:
    """An HF model with random weights of the preset's shape (at least ``min_vocab`` words), and legolm's copy of
    the same weights."""
    config = ModelConfig.from_name(preset)
    if config.vocab_size < min_vocab:
        config = ModelConfig.from_name(preset, vocab_size=min_vocab)
    hf = hf_random_model(config).to(device, dtype).eval()
    return hf, legolm_copy(hf, config).eval()


def gpt2_tokenizer() -> Tokenizer:
    carried = BENCH_DATA / "shared" / GPT2_TOKENIZER
    return Tokenizer.from_dir(carried if carried.is_dir() else shared_path(GPT2_TOKENIZER))


@contextlib.contextmanager
def legolm_server(model_dir: Path, device: str, dtype: str, max_batch: int, context: int,
                  log: Path) -> Iterator[str]:
    """``legolm serve`` in a subprocess; yields its base URL."""
    cmd = [sys.executable, "-m", "legolm.cli.main", "serve", "--model", str(model_dir), "--port", "0",
           "--device", device, "--dtype", dtype, "--max-batch", str(max_batch), "--max-context", str(context),
           "--served-model-name", MODEL_ID, "--log-level", "warning"]
    with spawned(cmd, log) as url:
        yield url.removesuffix("/v1")


@contextlib.contextmanager
def peer_server(hf_dir: Path, device: str, dtype: str, log: Path) -> Iterator[str]:
    """The peer in its own process, as legolm's server is (in this one, its generate threads would share the
    GIL with the load generator); yields its base URL."""
    cmd = [sys.executable, "-m", "benchmarks.serve", "--peer-server", str(hf_dir), "--peer-device", device,
           "--peer-dtype", dtype]
    with spawned(cmd, log) as url:
        yield url


@contextlib.contextmanager
def spawned(cmd: list[str], log: Path) -> Iterator[str]:
    """Run ``cmd`` until the context ends; yields the URL of the first stdout line that holds one."""
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + STARTUP_S
        line = ""
        while "http://" not in line:
            line = proc.stdout.readline()
            if (not line and proc.poll() is not None) or time.monotonic() > deadline:
                raise SystemExit(f"{cmd[2]} did not start: {log.read_text()}")
        yield line.strip().rsplit(" ", 1)[1]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


class _QueueStreamer:
    """A `transformers` streamer that hands each new token to an asyncio queue (the first put is the prompt)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[int | None]) -> None:
        self.loop, self.queue, self.prompt_seen = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, int(token))

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


Job = tuple[list[int], int, _QueueStreamer]


def peer_app(jobs: queue.Queue[Job]) -> Any:
    """The peer: POST /v1/completions (token-id prompt, stream: true) queues a ``generate`` job for the worker."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        loop, tokens = asyncio.get_running_loop(), asyncio.Queue()  # type: ignore[var-annotated]
        jobs.put((body["prompt"], int(body["max_tokens"]), _QueueStreamer(loop, tokens)))

        async def events() -> Any:
            while (token := await tokens.get()) is not None:
                yield f'data: {{"choices":[{{"index":0,"text":"","token":{token}}}]}}\n\n'
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def serve_peer(hf_dir: str, device: str, dtype: str) -> None:
    """``--peer-server``: load the exported HF model, serve `peer_app` from a background thread, and run every
    queued ``generate`` on this process's main thread, one request at a time, until terminated."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=getattr(torch, dtype)).to(device).eval()
    jobs: queue.Queue[Job] = queue.Queue()
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(peer_app(jobs), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    print(f"peer serving on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    with torch.inference_mode():
        while True:
            prompt, n, streamer = jobs.get()
            idx = torch.tensor([prompt], device=device)
            hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=n,
                        min_new_tokens=n, pad_token_id=0, streamer=streamer)


# -- the load ------------------------------------------------------------------------------------------------
@dataclass
class Trace:
    """One streamed request: when it was sent, when each chunk came, and how many tokens it held."""

    sent: float
    chunks: list[float] = field(default_factory=list)
    tokens: int = 0


async def _one(client: httpx.AsyncClient, url: str, prompt: list[int], new: int) -> Trace:
    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
            "ignore_eos": True}
    trace = Trace(time.perf_counter())
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"{url}: HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                trace.chunks.append(time.perf_counter())
    trace.tokens = new
    return trace


async def _level(url: str, prompts: list[list[int]], clients: int, rounds: int, new: int) -> tuple[list[Trace], float]:
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(timeout=None, limits=limits) as client:

        async def worker(i: int) -> list[Trace]:
            return [await _one(client, url, prompts[(i * rounds + r) % len(prompts)], new) for r in range(rounds)]

        t0 = time.perf_counter()
        traces = [t for ts in await asyncio.gather(*(worker(i) for i in range(clients))) for t in ts]
        return traces, time.perf_counter() - t0


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(traces: list[Trace], wall: float) -> dict[str, float]:
    ttft = [t.chunks[0] - t.sent for t in traces if t.chunks]
    itl = [b - a for t in traces for a, b in zip(t.chunks, t.chunks[1:], strict=False)]
    return {"tok/s": sum(t.tokens for t in traces) / wall, "ttft p50 ms": 1000 * _pct(ttft, 50),
            "ttft p99 ms": 1000 * _pct(ttft, 99), "itl p50 ms": 1000 * _pct(itl, 50),
            "itl p99 ms": 1000 * _pct(itl, 99), "requests": len(traces)}


def run_levels(name: str, url: str, prompts: list[list[int]], args: argparse.Namespace) -> list[dict[str, Any]]:
    asyncio.run(_level(url, prompts, 1, 1, args.new_tokens))  # warm-up: first graphs, first kernels
    rows = []
    for clients in args.clients:
        traces, wall = asyncio.run(_level(url, prompts, clients, args.rounds, args.new_tokens))
        stats = summarize(traces, wall)
        print(f"  {name} C={clients}: {stats['tok/s']:,.0f} tok/s, TTFT p50 {stats['ttft p50 ms']:.1f} ms, "
              f"ITL p50 {stats['itl p50 ms']:.2f} ms", flush=True)
        rows.append({"server": name, "clients": clients, **{k: _fmt(k, v) for k, v in stats.items()}})
    return rows


def _fmt(key: str, value: float) -> str:
    return f"{value:,.0f}" if key in ("tok/s", "requests") else f"{value:.1f}"


def prompts_for(tok: Tokenizer, length: int, count: int) -> list[list[int]]:
    path = BENCH_DATA / "tinyshakespeare_gpt2.npy"
    ids = np.load(path) if path.is_file() else np.array(tok.encode(shared_path("data/tinyshakespeare.txt")
                                                                    .read_text()[:200_000]))
    return [ids[i * 997: i * 997 + length].astype(np.int64).tolist() for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends one after another")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny-gpt2, 1 and 2 clients, 8 tokens")
    parser.add_argument("--peer-server", help=argparse.SUPPRESS)  # internal: the peer's own process
    parser.add_argument("--peer-device", help=argparse.SUPPRESS)
    parser.add_argument("--peer-dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_server:
        serve_peer(args.peer_server, args.peer_device, args.peer_dtype)
        return
    if args.smoke:
        args.models, args.clients, args.rounds, args.prompt_tokens, args.new_tokens = ["tiny-gpt2"], [1, 2], 1, 16, 8
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = "bfloat16" if device == "cuda" else "float32"
    tok = gpt2_tokenizer()
    prompts = prompts_for(tok, args.prompt_tokens, max(args.clients) * args.rounds)
    context = args.prompt_tokens + args.new_tokens
    rows: list[dict[str, Any]] = []
    for preset in args.models:
        hf, ours = build_pair(preset, device, getattr(torch, dtype_name), tok.vocab_size)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(ours, Path(tmp) / preset, tokenizer=tok)
            hf.save_pretrained(Path(tmp) / "hf")
            del ours, hf
            if device == "cuda":
                torch.cuda.empty_cache()
            print(f"{preset}: legolm serve", flush=True)
            with legolm_server(Path(tmp) / preset, device, dtype_name, max(args.clients), context,
                               Path(tmp) / "server.log") as url:
                rows += [{"model": preset, **r} for r in run_levels("legolm serve", url, prompts, args)]
            save(rows, args, complete=False)
            print(f"{preset}: transformers generate server", flush=True)
            with peer_server(Path(tmp) / "hf", device, dtype_name, Path(tmp) / "peer.log") as url:
                rows += [{"model": preset, **r} for r in run_levels("hf generate server", url, prompts, args)]
            save(rows, args, complete=False)
    print(f"\nServing, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens per request, {args.rounds} "
          f"requests per client, {dtype_name}, {device_info()['device']}")
    print(f"wrote {save(rows, args, complete=True)}")


def save(rows: list[dict[str, Any]], args: argparse.Namespace, complete: bool) -> Any:
    """Print (when complete) and write the table (not for --smoke: a CPU check leaves no result file)."""
    columns = ["model", "server", "clients", "tok/s", "ttft p50 ms", "ttft p99 ms", "itl p50 ms", "itl p99 ms",
               "requests"]
    table = print_table(rows, columns) if complete else ""
    if args.smoke:
        return "nothing (--smoke)"
    where = {} if torch.cuda.is_available() else {"cpu_cores": os.cpu_count(), "omp_threads": torch.get_num_threads()}
    return write_result("serve" if torch.cuda.is_available() else "serve-cpu",
                        {**device_info(), **where, "args": vars(args), "complete": complete, "rows": rows,
                         "table": table})


if __name__ == "__main__":
    main()

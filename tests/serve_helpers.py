"""Start a real `legolm serve` process on a free loopback port and talk to it."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

TINY_GPT2_CONTEXT = 1024
STARTUP_S = 180.0  # loading torch, FastAPI and the model on a busy 2-core machine
LISTENING = re.compile(r"on (http://[\d.]+:\d+)/v1")


@dataclass
class Server:
    """A running server: its base URL (without /v1), process and stderr log."""

    url: str
    proc: subprocess.Popen[str]
    log: Path

    def client(self, **kw: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kw)  # type: ignore[arg-type]

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=30).json()

    def metric(self, name: str, absent: float | None = None) -> float:
        """A metric's value (the sum over its label sets) from /metrics; ``absent`` where it is not there yet (a
        labelled counter appears at its first increment), else that fails."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {")]
        if not values and absent is not None:
            return absent
        assert values, f"{name} not in /metrics"
        return sum(values)


def legolm_command() -> list[str]:
    found = shutil.which("legolm", path=str(Path(sys.executable).parent)) or shutil.which("legolm")
    assert found, "the `legolm` console script is not installed"
    return [found]


@contextmanager
def running_server(args: list[str], log: Path) -> Iterator[Server]:
    """``legolm serve --port 0 ARGS`` until the block ends (then interrupted like Ctrl-C)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log.open("w") as err:
        proc = subprocess.Popen([*legolm_command(), "serve", "--port", "0", "--host", "127.0.0.1", "--device", "cpu",
                                 "--log-level", "warning", *args], stdout=subprocess.PIPE, stderr=err, text=True,
                                env=env)
    try:
        url = _wait_for_url(proc, log)
        server = Server(url, proc, log)
        assert server.health()["status"] == "ok"
        yield server
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_url(proc: subprocess.Popen[str], log: Path) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            match = LISTENING.search(line)
            if match:
                return match.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"legolm serve exited with {proc.returncode}: {log.read_text()}")
    raise AssertionError(f"legolm serve did not start within {STARTUP_S} s: {log.read_text()}")


def make_tiny_gpt2(directory: Path, tokenizer_dir: Path) -> Path:
    """A tiny random Hugging Face GPT-2 (1,024 positions) with the real GPT-2 tokenizer files beside it."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=TINY_GPT2_CONTEXT, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=50256, eos_token_id=50256)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory

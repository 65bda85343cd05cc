"""`legolm serve` on a memory-layer model: completions equal `legolm generate` (which now decodes memory
models), and a memory session exported from one server process and imported into another gives the
same next-token logits as continuing on the first, and as the library; foreign states are refused."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import torch

from legolm.checkpoints.native import save_checkpoint
from legolm.cli.main import main
from legolm.data.tokenizer import Tokenizer, train_bpe
from legolm.generation import GenerationConfig, generate
from legolm.layers.memory_state import (
    carry_memory,
    get_memory_state,
    load_memory_state,
    reset_memory,
    save_memory_state,
)
from legolm.model.factory import create_model
from legolm.model.transformer import TransformerLM
from tests.serve_helpers import Server, running_server

SEG = 8
VOCAB = 300
MODEL = "memory_model"
TEXT = ["the cat sat on the mat and the dog ran in the park. " * 10, "once upon a time there was a bird. " * 10]
FIRST = "the dog sat on the cat and then"
SECOND = "once upon a time the"
TOP = 5
CONTEXT = 1024


def memory_model(seed: int = 0, segment_len: int = SEG) -> TransformerLM:
    """An infini model (2 banks) with weights spread wide, so its memory changes its predictions."""
    torch.manual_seed(seed)
    model = create_model("infini", num_layers=2, base="tiny-pythia", segment_len=segment_len, vocab_size=VOCAB,
                         block_size=CONTEXT, num_memory_banks=2, segments_per_bank=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4)
    return model


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_bpe(TEXT, VOCAB)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    d = tmp_path_factory.mktemp("serve_memory") / MODEL
    save_checkpoint(memory_model(), d, tokenizer=tokenizer)
    return d


@pytest.fixture(scope="module")
def servers(model_dir: Path) -> Iterator[tuple[Server, Server]]:
    """Two server processes of the same checkpoint."""
    with ExitStack() as stack:
        a, b = (stack.enter_context(running_server(["--model", str(model_dir), "--max-batch", "2"],
                                                   model_dir.parent / f"server-{name}.log")) for name in "ab")
        yield a, b


def _complete(server: Server, prompt: str, **kw: object) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": prompt, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def _top(body: dict) -> dict[str, float]:
    return body["choices"][0]["logprobs"]["top_logprobs"][0]


def _memory(server: Server, session: str) -> bytes:
    r = httpx.get(f"{server.url}/v1/sessions/{session}/memory", timeout=60)
    assert r.status_code == 200, r.text
    return r.content


def test_memory_model_completion_equals_legolm_generate(servers: tuple[Server, Server], model_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(model_dir), "--prompt", FIRST, "--max-new-tokens", "20", "--greedy",
                 "--device", "cpu"]) == 0
    want = capsys.readouterr().out[:-1]
    assert _complete(servers[0], FIRST, max_tokens=20)["choices"][0]["text"] == want


def test_a_session_moves_to_another_server_process(servers: tuple[Server, Server], model_dir: Path,
                                                   tokenizer: Tokenizer, tmp_path: Path) -> None:
    a, b = servers
    first = _complete(a, FIRST, max_tokens=12, session="conv")["choices"][0]["text"]
    exported = _memory(a, "conv")
    # the file is save_memory_state's: the library loads it, and it is the memory of prompt + completion
    model = memory_model()
    ids = tokenizer.encode(FIRST)
    new = generate(model, [ids], GenerationConfig(max_new_tokens=12, greedy=True), eos_id=tokenizer.eos_id).tokens[0]
    assert tokenizer.decode(new) == first
    (tmp_path / "conv.safetensors").write_bytes(exported)
    load_memory_state(model, tmp_path / "conv.safetensors")
    loaded = get_memory_state(model)
    reset_memory(model)
    with torch.no_grad(), carry_memory(model):
        model(torch.tensor([ids + new]))
        for name, want in get_memory_state(model).items():
            torch.testing.assert_close(loaded[name], want, atol=1e-4, rtol=1e-4)
    # continue on A, and on B after the upload: the same next-token distribution
    on_a = _top(_complete(a, SECOND, max_tokens=1, logprobs=TOP, session="conv"))
    r = httpx.put(f"{b.url}/v1/sessions/moved/memory", content=exported, timeout=60)
    assert r.status_code == 200, r.text
    on_b = _top(_complete(b, SECOND, max_tokens=1, logprobs=TOP, session="moved"))
    assert on_b.keys() == on_a.keys()
    assert all(on_b[t] == pytest.approx(on_a[t], abs=1e-5) for t in on_a)
    load_memory_state(model, tmp_path / "conv.safetensors")
    with torch.no_grad(), carry_memory(model):
        lp = model(torch.tensor([tokenizer.encode(SECOND)]))[0, -1].log_softmax(-1)
    values, top_ids = lp.topk(TOP)
    assert {tokenizer.decode([i], skip_special_tokens=False): v for i, v in
            zip(top_ids.tolist(), values.tolist(), strict=True)} == pytest.approx(on_b, abs=1e-4)
    fresh = _top(_complete(b, SECOND, max_tokens=1, logprobs=TOP, session="fresh"))
    assert fresh != pytest.approx(on_b, abs=1e-3), "without the imported memory the prediction differs"
    assert _memory(a, "conv") == _memory(b, "moved"), "the continued conversations hold the same memory"


def test_foreign_or_broken_memory_is_refused(servers: tuple[Server, Server], tmp_path: Path) -> None:
    _, b = servers
    for name, other in (("weights", memory_model(seed=1)), ("architecture", memory_model(segment_len=2 * SEG))):
        with torch.no_grad(), carry_memory(other):
            other(torch.randint(0, VOCAB, (1, 3 * SEG)))
        save_memory_state(other, tmp_path / f"{name}.safetensors")
        r = httpx.put(f"{b.url}/v1/sessions/x/memory", content=(tmp_path / f"{name}.safetensors").read_bytes(),
                      timeout=60)
        assert r.status_code == 400 and ("other weights" if name == "weights" else "another architecture") in \
            r.json()["error"]["message"], r.text
    r = httpx.put(f"{b.url}/v1/sessions/x/memory", content=b"not a memory file", timeout=60)
    assert r.status_code == 400 and "not a safetensors" in r.json()["error"]["message"]
    assert httpx.get(f"{b.url}/v1/sessions/x/memory", timeout=60).status_code == 404
    assert httpx.get(f"{b.url}/v1/sessions/bad id/memory", timeout=60).status_code in (400, 404)


def test_delete_forgets_a_session(servers: tuple[Server, Server]) -> None:
    a, _ = servers
    _complete(a, FIRST, max_tokens=2, session="gone")
    assert len(_memory(a, "gone")) > 0
    assert httpx.delete(f"{a.url}/v1/sessions/gone/memory", timeout=60).json()["deleted"] is True
    assert httpx.get(f"{a.url}/v1/sessions/gone/memory", timeout=60).status_code == 404
    assert httpx.delete(f"{a.url}/v1/sessions/gone/memory", timeout=60).status_code == 404
    assert a.health()["free"] == 2

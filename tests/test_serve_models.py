"""`legolm serve` on the other model kinds: a LEGO model with threshold early exit, the fused batch-1 step
(Triton's interpreter off the GPU), and the real SmolLM2-135M-Instruct GGUF with its own chat template,
each equal to `legolm generate`."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import torch

import legolm
from legolm.checkpoints.native import save_checkpoint
from legolm.cli.main import main
from legolm.core.config import ModelConfig
from legolm.data.tokenizer import train_bpe
from legolm.generation import GenerationConfig, complete
from legolm.generation.generate import DEFAULT_KV_MODE
from legolm.model.lego import LegoLM
from legolm.serve.backends import make_backend
from legolm.serve.config import ServeConfig
from legolm.serve.job import Job
from legolm.serve.metrics import Metrics
from legolm.serve.sampler import SamplingParams
from tests.serve_helpers import make_tiny_gpt2, running_server

TEXT = ["the cat sat on the mat and the dog ran in the park. " * 10, "once upon a time there was a bird. " * 10]
VOCAB, SPLIT, DEPTH, THRESHOLD = 300, 2, 5, 0.5


def _generate(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What `legolm generate --greedy ARGS` prints (without the last newline)."""
    code = main(["generate", "--greedy", "--device", "cpu", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out[:-1]


def lego_model() -> LegoLM:
    """A 2 -> 5 layer LEGO model with widely spread weights (some tokens exit at τ = 0.5, some do not)."""
    torch.manual_seed(0)
    model = LegoLM(ModelConfig.from_name("tiny-pythia", vocab_size=VOCAB))
    model.mark_trained()
    model.extend(DEPTH, THRESHOLD)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def lego_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("serve_lego") / "lego"
    save_checkpoint(lego_model(), d, tokenizer=train_bpe(TEXT, VOCAB))
    return d


def test_lego_server_decodes_through_the_exits(lego_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = ["--early-exit", "threshold", "--threshold", str(THRESHOLD)]
    text, stats = _generate(["--model", str(lego_dir), "--prompt", "the cat sat", "--max-new-tokens", "16", *flags],
                            capsys).rsplit("\n", 1)
    assert stats.startswith(f"early exit (kv {DEFAULT_KV_MODE}):")  # the model measured no kv mode
    with running_server(["--model", str(lego_dir), *flags], lego_dir.parent / "server.log") as server:
        client = server.client()
        r = client.completions.create(model="lego", prompt="the cat sat", max_tokens=16, temperature=0)
        assert r.choices[0].text == text
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="lego", prompt="the cat sat", max_tokens=16, temperature=0, stream=True))
        assert streamed == text
        kw = {"model": "lego", "prompt": "once upon", "max_tokens": 8, "temperature": 0.9, "seed": 3}
        assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text  # type: ignore[call-overload]
        with pytest.raises(openai.BadRequestError, match="logprobs"):
            client.completions.create(model="lego", prompt="x", max_tokens=2, logprobs=1)
        assert server.health()["backend"] == "lego"
        assert server.metric('legolm_early_exit_tokens_total{exit="shallow"}') > 0
        assert server.metric('legolm_early_exit_tokens_total{exit="deep"}') > 0


def test_greedy_only_lego_modes_refuse_sampling_and_default_to_greedy() -> None:
    config = ServeConfig(early_exit="speculative", max_batch=1)
    backend = make_backend(lego_model(), config, None, Metrics(1))
    assert backend.greedy_only
    job = Job([1, 2], 4, SamplingParams(greedy=False, temperature=0.7), lambda e: None)
    with pytest.raises(Exception, match="greedily"):
        backend.check(job)


@pytest.mark.parametrize("if_nodes", [False, True])
def test_the_lego_server_passes_its_decoder_settings_on(if_nodes: bool) -> None:
    config = ServeConfig(early_exit="threshold", fused=True, fused_if_nodes=if_nodes, fused_pdl=not if_nodes,
                         max_batch=1)
    backend = make_backend(lego_model(), config, None, Metrics(1))
    gen = backend._generation(4, SamplingParams(), stop_at_eos=True)  # type: ignore[attr-defined]
    assert (gen.fused, gen.fused_if_nodes, gen.fused_pdl, gen.early_exit) == (True, if_nodes, not if_nodes, "threshold")


@pytest.mark.parametrize("kernel", ["blocks", "splitk"])
def test_fused_server_equals_the_batched_one(tmp_path: Path, gpt2_tokenizer_dir: Path,
                                             capsys: pytest.CaptureFixture[str], kernel: str) -> None:
    """--fused: each request through the fused batch-1 step (interpreted Triton here), two at a time; five-kernel
    or split-K blocks."""
    model_dir = make_tiny_gpt2(tmp_path / "tiny_gpt2", gpt2_tokenizer_dir)
    want = _generate(["--model", str(model_dir), "--prompt", "Hello there", "--max-new-tokens", "2"], capsys)
    with running_server(["--model", str(model_dir), "--fused", "--fused-kernel", kernel, "--max-batch", "2",
                         "--max-context", "32"], tmp_path / "server.log") as server:
        r = server.client().completions.create(model="tiny_gpt2", prompt="Hello there", max_tokens=2, temperature=0)
        assert r.choices[0].text == want
        assert server.health()["backend"] == "fused"


@pytest.mark.slow
def test_smollm2_gguf_server_completes_and_chats_like_legolm_generate(smollm2_gguf: Path, tmp_path: Path) -> None:
    """The real SmolLM2-135M-Instruct (4-bit GGUF) on the CPU: a completion and a chat reply (its GGUF chat
    template), a few tokens each, equal to what `legolm generate --greedy` prints for the same (templated)
    prompt (`generation.complete`, its library call, on one load of the model)."""
    prompt = "The capital of France is"
    rendered = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    model, tok = legolm.load(smollm2_gguf)
    want_text = complete(model, tok, [prompt], GenerationConfig(max_new_tokens=4, greedy=True))[0][0]
    want_chat = complete(model, tok, [rendered], GenerationConfig(max_new_tokens=6, greedy=True))[0][0]
    del model
    with running_server(["--model", str(smollm2_gguf), "--max-batch", "2", "--max-context", "128"],
                        tmp_path / "server.log") as server:
        client: openai.OpenAI = server.client()
        name = "SmolLM2-135M-Instruct.Q4_1"
        r = client.completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0)
        assert r.choices[0].text == want_text and "Paris" in want_text
        chat = client.chat.completions.create(model=name, max_tokens=6, temperature=0, stream=True,
                                              messages=[{"role": "user", "content": "What is the capital of France?"}])
        reply = "".join(c.choices[0].delta.content or "" for c in chat)
        assert reply == want_chat and "Paris" in reply
        assert httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"][0]["max_model_len"] == 128

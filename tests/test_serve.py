"""`legolm serve` as a real process on a loopback port, through the official `openai` client: completions
and chat (streaming and not) equal to `legolm generate`, concurrent streams sharing the batch, stop
strings, seeds, logprobs, a bounded load test, a client that leaves mid-stream, and bad input."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch

import legolm
from legolm.cli.main import main
from legolm.generation import GenerationConfig, generate
from tests.serve_helpers import TINY_GPT2_CONTEXT, Server, make_tiny_gpt2, running_server

MODEL = "tiny_gpt2"
CONTEXT = TINY_GPT2_CONTEXT
MAX_BATCH = 4
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer_dir: Path) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("serve") / MODEL, gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    template = tmp_path_factory.mktemp("tpl") / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    with running_server(["--model", str(model_dir), "--max-batch", str(MAX_BATCH), "--context-bucket", "64",
                         "--chat-template", str(template)], model_dir.parent / "server.log") as s:
        yield s


def cli_generate(model_dir: Path, prompt: str, n: int, capsys: pytest.CaptureFixture[str]) -> str:
    """What `legolm generate --greedy` prints for ``prompt`` (its trailing newline removed)."""
    code = main(["generate", "--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", str(n),
                 "--greedy", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out[:-1]


def streamed(stream: openai.Stream) -> tuple[str, str | None]:
    """The joined text and the finish reason of a completion stream."""
    texts, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            texts.append(choice.text if hasattr(choice, "text") else (choice.delta.content or ""))
            finish = choice.finish_reason or finish
    return "".join(texts), finish


def assert_idle(server: Server) -> None:
    """The server is healthy and every row is free again."""
    for _ in range(100):
        h = server.health()
        if h["running"] == 0 and h["waiting"] == 0:
            break
        threading.Event().wait(0.1)
    assert h["status"] == "ok" and h["free"] == h["capacity"] == MAX_BATCH, h


# -- equal to legolm generate -------------------------------------------------------------------------
@pytest.mark.parametrize("prompt,n", [("Hello there", 12), ("A much longer prompt about the sea and the sky", 30)])
def test_completion_equals_legolm_generate(server: Server, model_dir: Path, prompt: str, n: int,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    want = cli_generate(model_dir, prompt, n, capsys)
    client = server.client()
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0)
    assert r.choices[0].text == want and want
    assert r.choices[0].finish_reason == "length"
    ids = legolm.load_tokenizer(model_dir).encode(prompt)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    text, finish = streamed(client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0,
                                                      stream=True))
    assert (text, finish) == (want, "length")


def test_chat_equals_legolm_generate_on_the_templated_prompt(server: Server, model_dir: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    rendered = "<|system|>Be brief.\n<|user|>Name a colour.\n<|assistant|>"
    want = cli_generate(model_dir, rendered, 10, capsys)
    client = server.client()
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    text, finish = streamed(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,  # type: ignore[arg-type]
                                                           temperature=0, stream=True))
    assert (text, finish) == (want, "length")


# -- batching -----------------------------------------------------------------------------------------
def test_two_concurrent_streams_share_the_batch(server: Server, model_dir: Path) -> None:
    """A long stream is running when a second one joins; both equal their solo greedy decodes, and decode
    steps ran with both rows."""
    model, tok = legolm.load(model_dir)
    prompts, lengths = ["The first story begins", "Second"], [400, 60]
    solo = [tok.decode(generate(model, [tok.encode(p)], GenerationConfig(max_new_tokens=n, greedy=True,
                                                                          stop_at_eos=False)).tokens[0])
            for p, n in zip(prompts, lengths, strict=True)]
    two_rows_before = server.metric("legolm_batch_occupancy_count") - server.metric(
        'legolm_batch_occupancy_bucket{le="1.0"}')
    client = server.client()
    first = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=lengths[0], temperature=0,
                                      stream=True, extra_body={"ignore_eos": True})
    chunks = iter(first)
    head = next(chunks).choices[0].text  # the first stream is running
    second, finish = streamed(client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=lengths[1],
                                                        temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert finish == "length"
    rest, _ = streamed(chunks)  # type: ignore[arg-type]
    assert [head + rest, second] == solo
    two_rows = server.metric("legolm_batch_occupancy_count") - server.metric('legolm_batch_occupancy_bucket{le="1.0"}')
    assert two_rows - two_rows_before >= lengths[1] - 1, "the second request joined the running batch"
    assert_idle(server)


def test_seeded_sampling_stop_strings_and_logprobs(server: Server, model_dir: Path) -> None:
    client = server.client()
    kw = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 0.9, "top_p": 0.95}
    a, b = (client.completions.create(seed=7, **kw).choices[0].text for _ in range(2))  # type: ignore[call-overload]
    assert a == b, "a seed fixes the request's own draws"
    top1 = client.completions.create(**{**kw, "extra_body": {"top_k": 1}})  # type: ignore[call-overload]
    greedy = client.completions.create(**{**kw, "temperature": 0})  # type: ignore[call-overload]
    assert top1.choices[0].text == greedy.choices[0].text
    text = greedy.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = client.completions.create(**{**kw, "temperature": 0, "stop": [stop, "never-seen"]})  # type: ignore[call-overload]
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    text_s, finish = streamed(client.completions.create(**{**kw, "temperature": 0, "stop": stop, "stream": True}))  # type: ignore[call-overload]
    assert (text_s, finish) == (cut.choices[0].text, "stop")
    lp = client.completions.create(**{**kw, "temperature": 0, "max_tokens": 3, "logprobs": 2}).choices[0].logprobs  # type: ignore[call-overload]
    model, tok = legolm.load(model_dir)
    ids = tok.encode("Once upon a time") + tok.encode(greedy.choices[0].text)[:2]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0, -3:].log_softmax(-1)
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), want.max(-1).values, atol=1e-4, rtol=1e-4)
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(p) for top, p in
               zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    assert_idle(server)


# -- load ----------------------------------------------------------------------------------------------
async def _stream_all(url: str, clients: int, max_tokens: int) -> list[tuple[str, str | None, int]]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(i: int) -> tuple[str, str | None, int]:
        stream = await client.completions.create(
            model=MODEL, prompt=f"Client {i} says", max_tokens=max_tokens, temperature=0.8, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        texts, finish, used = [], None, -1
        async for chunk in stream:
            for choice in chunk.choices:
                texts.append(choice.text)
                finish = choice.finish_reason or finish
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        return "".join(texts), finish, used

    try:
        return await asyncio.gather(*(one(i) for i in range(clients)))
    finally:
        await client.close()


def test_32_concurrent_streaming_clients_all_complete(server: Server) -> None:
    # 0 where this server has answered no completion yet (the tests share it, in any order)
    ok_before = server.metric('legolm_requests_total{endpoint="/v1/completions",status="200"}', absent=0.0)
    results = asyncio.run(_stream_all(server.url, 32, 24))
    assert all(finish == "length" and used == 24 and text for text, finish, used in results), results
    ok = server.metric('legolm_requests_total{endpoint="/v1/completions",status="200"}') - ok_before
    assert ok == 32
    assert_idle(server)


def test_a_client_that_leaves_mid_stream_frees_its_row(server: Server) -> None:
    cancelled = server.metric("legolm_cancelled_requests_total")
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "Go on", "max_tokens": 900, "temperature": 0,
                            "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.health()["running"] == 1
    assert_idle(server)  # the row is free long before 900 tokens
    assert server.metric("legolm_cancelled_requests_total") == cancelled + 1


# -- bad input -------------------------------------------------------------------------------------------
BAD = [
    ("{not json", 400, "not valid JSON"),
    ('{"model": "gpt-4", "prompt": "x"}', 404, "does not exist"),
    ('{"model": "tiny_gpt2", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ('{"model": "tiny_gpt2", "prompt": "x", "max_tokens": ' + str(CONTEXT) + "}", 400, "context"),
    ('{"model": "tiny_gpt2", "prompt": "' + "word " * (CONTEXT + 1) + '"}', 400, "context"),
    ('{"model": "tiny_gpt2", "prompt": "x", "temprature": 0.5}', 400, "unknown field 'temprature'"),
    ('{"model": "tiny_gpt2", "prompt": "x", "n": 2}', 400, "n > 1"),
    ('{"model": "tiny_gpt2", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    ('{"model": "tiny_gpt2", "prompt": "x", "session": "s1"}', 400, "no memory layers"),
    ('{"model": "tiny_gpt2", "prompt": [99999999]}', 400, "vocabulary"),
    ('{"model": "tiny_gpt2", "prompt": ""}', 400, "empty"),
    ('{"model": "tiny_gpt2", "messages": []}', 400, "prompt"),
    ('[1, 2]', 400, "JSON object"),
    ('{"model": "tiny_gpt2", "prompt": "x", "seed": 18446744073709551616}', 400, "seed"),
    ('{"model": "tiny_gpt2", "prompt": "x", "top_p": 0}', 400, "top_p"),
]


@pytest.mark.parametrize("body,status,fragment", BAD)
def test_bad_requests_get_openai_error_bodies(server: Server, body: str, status: int, fragment: str) -> None:
    r = httpx.post(f"{server.url}/v1/completions", content=body, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment.lower() in error["message"].lower() and error["type"]
    assert server.health()["free"] == MAX_BATCH


def test_bad_chat_requests_and_the_client_sees_openai_errors(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])  # type: ignore[misc, list-item]
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=2)
    r = httpx.get(f"{server.url}/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    assert_idle(server)


def test_models_health_and_metrics(server: Server) -> None:
    assert [m.id for m in server.client().models.list()] == [MODEL]
    h = server.health()
    assert h["backend"] == "batched" and h["capacity"] == MAX_BATCH
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    for name in ("legolm_requests_total", "legolm_completion_tokens_total", "legolm_time_to_first_token_seconds_bucket",
                 "legolm_inter_token_latency_seconds_count", "legolm_batch_occupancy_bucket", "legolm_running_requests",
                 "legolm_request_duration_seconds_sum"):
        assert name in text


# -- the command's own bad input -----------------------------------------------------------------------------
def _busy_port() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("flags,fragment", [
    (["--max-batch", "0"], "max_batch"),
    (["--early-exit", "threshold"], "LEGO model"),
    (["--chat-template", "/nonexistent/chat.jinja"], "chat template"),
    (["--threshold", "0.5"], "without --early-exit"),
    (["--fused-embed-block", "1000"], "power of two"),
    (["--fused-persistent.num-warps", "3"], "persistent num_warps must be a power of two"),
])
def test_serve_bad_flags_are_one_line(model_dir: Path, flags: list[str], fragment: str,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["serve", "--model", str(model_dir), "--device", "cpu", "--port", "0", *flags])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and err.startswith("legolm: error:") and fragment in err, err


def test_serve_unknown_fused_kernel_is_one_line(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:  # argparse's own choice check
        main(["serve", "--model", str(model_dir), "--device", "cpu", "--port", "0", "--fused-kernel", "megakernel"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1, err
    assert "expected one of blocks|splitk|splitk-exact|persistent" in err, err


def test_serve_missing_model_and_busy_port_are_one_line(model_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", str(tmp_path / "missing"), "--device", "cpu", "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    busy = _busy_port()
    try:
        assert main(["serve", "--model", str(model_dir), "--device", "cpu", "--port", str(busy.getsockname()[1])]) == 2
        err = capsys.readouterr().err
        assert err.startswith("legolm: error: cannot listen") and err.count("\n") == 1, err
    finally:
        busy.close()

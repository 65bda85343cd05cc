"""The `legolm` command line end to end: in-process through `main()` and as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from tiny_hf import make_hf

import legolm
from legolm.cli.main import main
from legolm.generation import GenerationConfig, generate_text


def _console_script() -> list[str]:
    """The installed `legolm` console script (next to this Python, else on PATH)."""
    found = shutil.which("legolm", path=str(Path(sys.executable).parent)) or shutil.which("legolm")
    assert found, "the `legolm` console script is not installed (pyproject [project.scripts])"
    return [found]


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(_console_script() + args, capture_output=True, text=True, timeout=timeout, env=env)


def _assert_user_error(code: int, out: str, err: str, *fragments: str) -> str:
    """Exit 2, exactly one stderr line 'legolm: error: ...' naming the problem, no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert len(lines) == 1, f"expected one stderr line, got: {err!r}"
    assert lines[0].startswith("legolm: error:")
    assert "Traceback" not in out + err
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


# -- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory, gpt2_tokenizer_dir: Path) -> Path:
    """A tiny random HF GPT-2 with the real GPT-2 tokenizer files beside it."""
    d = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=50256, eos_token_id=50256)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(d)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_tokenizer_dir / name, d / name)
    return d


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- happy paths --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_console_script_generates_paris(smollm2_gguf: Path) -> None:
    proc = _run(["generate", "--model", str(smollm2_gguf), "--prompt", "The capital of France is",
                 "--max-new-tokens", "8", "--greedy"])
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_console_script_help() -> None:
    proc = _run(["--help"], timeout=120)
    assert proc.returncode == 0 and "generate" in proc.stdout and "export" in proc.stdout


def test_generate_in_process_matches_library(tiny_gpt2_dir: Path, capsys) -> None:
    prompts = ["Hello there", "A much longer prompt about the sea"]
    code = main(["generate", "--model", str(tiny_gpt2_dir), "--prompt", prompts[0], "--prompt", prompts[1],
                 "--max-new-tokens", "5", "--greedy", "--device", "cpu", "--no-stop-at-eos"])
    out, err = capsys.readouterr()
    assert code == 0, err
    model, tok = legolm.load(tiny_gpt2_dir)
    expected = generate_text(model, tok, prompts, GenerationConfig(greedy=True, max_new_tokens=5,
                                                                    stop_at_eos=False))
    assert out == "".join(t + "\n" for t in expected)
    assert all(len(tok.encode(t)) >= 1 for t in expected)


def test_generate_fused_matches_the_torch_decoder(tiny_gpt2_dir: Path, capsys) -> None:
    """`--fused` (its Triton kernels in the CPU interpreter here) prints the torch decoder's continuation."""
    args = ["generate", "--model", str(tiny_gpt2_dir), "--prompt", "A much longer prompt about the sea",
            "--max-new-tokens", "4", "--greedy", "--device", "cpu", "--no-stop-at-eos"]
    assert main(args) == 0
    want = capsys.readouterr().out
    assert main([*args, "--fused"]) == 0  # the default: split-K blocks, int64 fixed-point residual stream
    assert capsys.readouterr().out == want
    # another kernel through the flag (three launches per block, fp32 sums); every kernel's tokens against the
    # torch step: tests/test_fused_decode.py and tests/test_persistent_decode.py
    assert main([*args, "--fused", "--fused-kernel", "splitk"]) == 0
    assert capsys.readouterr().out == want
    assert main([*args, "--fused", "--fused-kernel", "persistent", "--fused-persistent.tile", "1000"]) == 2
    assert capsys.readouterr().err.strip() == "legolm: error: persistent tile must be a power of two, got 1000"


def test_generate_echo_and_seeded_sampling(tiny_gpt2_dir: Path, capsys) -> None:
    args = ["generate", "--model", str(tiny_gpt2_dir), "--prompt", "Once upon", "--max-new-tokens", "6",
            "--seed", "7", "--top-k", "50", "--echo", "--device", "cpu"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    second = capsys.readouterr().out
    assert first == second and first.startswith("Once upon")


def test_export_hf_then_transformers_loads_it(tiny_gpt2_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "exported"
    assert main(["export", "--model", str(tiny_gpt2_dir), "--out", str(out), "--format", "hf"]) == 0
    assert "wrote hf checkpoint" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    orig = transformers.AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype=torch.float32).eval()
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert (hf(x).logits - orig(x).logits).abs().max().item() <= 1e-5
    # The exported tokenizer is the same tokenizer.
    text = "Exported tokenizers keep their merges."
    assert legolm.load_tokenizer(out).encode(text) == legolm.load_tokenizer(tiny_gpt2_dir).encode(text)


def test_export_legolm_format_and_overwrite(tiny_gpt2_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "native"
    assert main(["export", "--model", str(tiny_gpt2_dir), "--out", str(out), "--format", "legolm"]) == 0
    assert (out / "legolm.json").is_file()
    x = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        assert torch.equal(legolm.load_pretrained(out)(x), legolm.load_pretrained(tiny_gpt2_dir)(x))
    (out / "stale.txt").write_text("old")
    assert main(["export", "--model", str(tiny_gpt2_dir), "--out", str(out), "--format", "legolm",
                 "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "legolm.json").is_file()
    capsys.readouterr()


# -- user errors: exit 2, one line, no traceback ----------------------------------------------------
def test_missing_path(tmp_path: Path, capsys) -> None:
    code = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi", "--device", "cpu"])
    _assert_user_error(code, *capsys.readouterr(), "does not exist")


def test_missing_path_as_subprocess(tmp_path: Path) -> None:
    proc = _run(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"], timeout=120)
    _assert_user_error(proc.returncode, proc.stdout, proc.stderr, "does not exist")


def test_unsupported_architecture(tmp_path: Path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    code = main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--device", "cpu"])
    _assert_user_error(code, *capsys.readouterr(), "unsupported architecture", "bert")


def test_config_does_not_match_weights(tiny_gpt2_dir: Path, tmp_path: Path, capsys) -> None:
    d = _copy(tiny_gpt2_dir, tmp_path / "edited")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    code = main(["generate", "--model", str(d), "--prompt", "hi", "--device", "cpu"])
    _assert_user_error(code, *capsys.readouterr(), "shape")


def test_truncated_safetensors(tiny_gpt2_dir: Path, tmp_path: Path, capsys) -> None:
    d = _copy(tiny_gpt2_dir, tmp_path / "truncated")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    code = main(["generate", "--model", str(d), "--prompt", "hi", "--device", "cpu"])
    _assert_user_error(code, *capsys.readouterr(), "truncated")


def test_invalid_config_json_and_missing_weights(tiny_gpt2_dir: Path, tmp_path: Path, capsys) -> None:
    d = _copy(tiny_gpt2_dir, tmp_path / "broken")
    (d / "config.json").write_text("{not json")
    code = main(["generate", "--model", str(d), "--prompt", "hi", "--device", "cpu"])
    _assert_user_error(code, *capsys.readouterr(), "not valid JSON")
    d2 = _copy(tiny_gpt2_dir, tmp_path / "noweights")
    (d2 / "model.safetensors").unlink()
    code = main(["generate", "--model", str(d2), "--prompt", "hi", "--device", "cpu"])
    _assert_user_error(code, *capsys.readouterr(), "no weights")


def test_weights_of_another_architecture(tmp_path: Path, capsys) -> None:
    make_hf("llama-untied").save_pretrained(tmp_path)  # Llama weights under a GPT-2 config.json
    capsys.readouterr()  # drop transformers' save progress bar
    cfg = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 64, "vocab_size": 97}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    code = main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--device", "cpu"])
    _assert_user_error(code, *capsys.readouterr(), "mapping")


def _write_gguf(path: Path, arch: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_of_unknown_architecture(tmp_path: Path, capsys) -> None:
    path = _write_gguf(tmp_path / "mamba.gguf", "mamba")
    code = main(["generate", "--model", str(path), "--prompt", "hi", "--device", "cpu"])
    _assert_user_error(code, *capsys.readouterr(), "mamba")


def test_gguf_of_unknown_architecture_export(tmp_path: Path, capsys) -> None:
    path = _write_gguf(tmp_path / "mamba.gguf", "mamba")
    code = main(["export", "--model", str(path), "--out", str(tmp_path / "out")])
    _assert_user_error(code, *capsys.readouterr(), "mamba")
    assert not (tmp_path / "out").exists()


def test_truncated_gguf(smollm2_gguf: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "cut.gguf"
    with smollm2_gguf.open("rb") as src:
        path.write_bytes(src.read(smollm2_gguf.stat().st_size // 2))
    code = main(["generate", "--model", str(path), "--prompt", "hi", "--device", "cpu"])
    _assert_user_error(code, *capsys.readouterr(), "truncated")


def test_not_a_gguf_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    code = main(["generate", "--model", str(path), "--prompt", "hi", "--device", "cpu"])
    _assert_user_error(code, *capsys.readouterr(), "junk.gguf")


def test_empty_prompt(tiny_gpt2_dir: Path, capsys) -> None:
    code = main(["generate", "--model", str(tiny_gpt2_dir), "--prompt", "", "--device", "cpu"])
    _assert_user_error(code, *capsys.readouterr(), "empty prompt")


def test_bad_generation_settings(tiny_gpt2_dir: Path, capsys) -> None:
    for flags, fragment in ((["--max-new-tokens", "0"], "max_new_tokens"), (["--top-p", "0"], "top_p"),
                            (["--temperature", "0"], "temperature")):
        code = main(["generate", "--model", str(tiny_gpt2_dir), "--prompt", "hi", "--device", "cpu", *flags])
        _assert_user_error(code, *capsys.readouterr(), fragment)


def test_prompt_longer_than_context(tiny_gpt2_dir: Path, capsys) -> None:
    code = main(["generate", "--model", str(tiny_gpt2_dir), "--prompt", "word " * 80, "--device", "cpu",
                 "--max-new-tokens", "4"])
    _assert_user_error(code, *capsys.readouterr(), "context")


def test_export_to_existing_directory_without_overwrite(tiny_gpt2_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "existing"
    out.mkdir()
    (out / "precious.txt").write_text("do not touch")
    for fmt in ("hf", "legolm"):
        code = main(["export", "--model", str(tiny_gpt2_dir), "--out", str(out), "--format", fmt])
        _assert_user_error(code, *capsys.readouterr(), "already exists", "--overwrite")
        assert [p.name for p in out.iterdir()] == ["precious.txt"]
        assert (out / "precious.txt").read_text() == "do not touch"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no temp dirs left behind


def test_python_dash_m_legolm_is_the_legolm_command(tmp_path: Path) -> None:
    """``python -m legolm`` runs the same CLI: here a user mistake, one line and exit 2."""
    proc = subprocess.run([sys.executable, "-m", "legolm", "generate", "--model", str(tmp_path / "nope"), "--prompt",
                           "x"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(Path(legolm.__file__).parents[1])})
    expected = f"legolm: error: model path {tmp_path / 'nope'} does not exist"
    assert proc.returncode == 2 and proc.stderr.strip() == expected, proc.stderr


def test_a_relative_legolm_data_is_made_absolute_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``LEGOLM_DATA=../shared`` names the folder beside the one the command started in, for the whole command and
    the processes it starts."""
    (tmp_path / "checkout").mkdir()
    (tmp_path / "shared").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")
    monkeypatch.setenv("LEGOLM_DATA", "../shared")
    assert main(["generate", "--model", "nope/", "--prompt", "x"]) == 2
    capsys.readouterr()
    assert os.environ["LEGOLM_DATA"] == str(tmp_path / "shared")

"""`legolm finetune` end to end (console-script subprocesses) on a tiny GPT-2 and real Shakespeare text.

The LoRA run's adapter must load in peft onto the transformers base and reproduce the merged
model legolm saved; the held-out perplexity must drop; user mistakes exit 2 with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers

import legolm
from legolm.adapters import load_adapter
from legolm.cli.main import main
from legolm.eval.sanity import PPLBands

COMMON = ["--window", "64", "--batch-size", "8", "--max-steps", "24", "--eval.every", "12", "--eval.max-batches", "2",
          "--eval-tokens", "1500", "--schedule.warmup-steps", "4", "--optim.lr", "0.01", "--no-run.progress"]
# The Skip2-LoRA runs pass over their training data several times: 3 of the text's ~10,000-character documents
# (one held out, still over 1,500 tokens) make an epoch 12 steps instead of 29.
THREE_DOCUMENTS = ["--data.max-documents", "3", "--data.val-fraction", "0.34"]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("legolm", path=str(Path(sys.executable).parent)) or shutil.which("legolm")
    assert exe, "the legolm console script is not installed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([exe, "finetune", *args], capture_output=True, text=True, timeout=600, env=env)


def _in_process(args: list[str], capfd: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess[str]:
    """`main` as the console script calls it: exit code and what reached the process's stdout and stderr (file
    descriptors). Bad input runs here, without a new interpreter's imports; the console script's own refusal is the
    second run of `test_lora_finetune_end_to_end_and_peft_loads_the_adapter`."""
    capfd.readouterr()
    try:
        code = main(["finetune", *args])
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def _one_line_error(res: subprocess.CompletedProcess[str], fragment: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("legolm: error:") and fragment in lines[0], res.stderr


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, gpt2_tokenizer_dir: Path, shakespeare_text: str
          ) -> tuple[Path, Path]:
    """A tiny random HF GPT-2 (real GPT-2 tokenizer beside it) and 60 kB of Tiny Shakespeare."""
    d = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=50256, eos_token_id=50256)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(d / "base")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_tokenizer_dir / name, d / "base" / name)
    (d / "shakespeare.txt").write_text(shakespeare_text[:60_000])
    return d / "base", d / "shakespeare.txt"


def test_lora_finetune_end_to_end_and_peft_loads_the_adapter(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, text = setup
    run = tmp_path / "run"
    args = ["--method", "lora", "--model", str(base), "--data", str(text), "--lora.target-modules", "c_attn", "c_proj",
            "--lora.r", "4", "--lora.alpha", "8", "--save-merged", "--run.out-dir", str(run), *COMMON]
    res = _run(args)
    assert res.returncode == 0, res.stderr
    assert "trainable params: 2,816 || all params:" in res.stdout  # 2 x (c_attn 4·(32+96) + c_proj 4·64 + 4·160)
    assert "blocks.*.mlp.proj (transformer.h.*.mlp.c_proj)" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["ppl"] < 0.97 * summary["before"]["ppl"]
    assert summary["before"]["n_tokens"] == summary["after"]["n_tokens"] == 1499
    assert (run / "metrics.jsonl").is_file() and (run / "config.yaml").is_file()

    x = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    merged = legolm.load_pretrained(run / "model")
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), run / "adapter")
    ours = legolm.load_pretrained(base)
    load_adapter(ours, run / "adapter")
    with torch.no_grad():
        reference = theirs.eval()(x).logits
        torch.testing.assert_close(merged(x), reference, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours(x), reference, atol=1e-4, rtol=0)
        assert (reference - legolm.load_pretrained(base)(x)).abs().max() > 1e-3  # training moved the adapter

    _one_line_error(_run(args), "already exists")


def test_full_finetune_saves_a_plain_model(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, text = setup
    run = tmp_path / "full"
    res = _run(["--method", "full", "--model", str(base), "--data", str(text), "--run.out-dir", str(run), *COMMON])
    assert res.returncode == 0, res.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["ppl"] < 0.5 * summary["before"]["ppl"]
    # the random base is not learning (its perplexity is far above 1,000); each perplexity gets its check line
    assert summary["before"]["ppl"] > 1000 and summary["ppl_check"]["held-out before"]["band"] == "not_learning"
    for label in ("held-out before", "held-out after"):
        check = PPLBands().check(label, summary[label.split()[-1]]["ppl"], 50257)
        assert check.message in res.stdout.splitlines() and summary["ppl_check"][label]["band"] == check.band
    assert "adapter" not in summary["outputs"] and not (run / "adapter").exists()
    tuned, start = legolm.load_pretrained(run / "model"), legolm.load_pretrained(base)
    assert all(not torch.equal(a, b) for (_, a), (_, b) in
               zip(tuned.state_dict().items(), start.state_dict().items(), strict=True) if a.dim() == 2)


def test_bad_input_is_one_line_exit_2(setup: tuple[Path, Path], tmp_path: Path,
                                     capfd: pytest.CaptureFixture[str]) -> None:
    base, text = setup
    args = ["--model", str(base), "--data", str(text), "--run.out-dir", str(tmp_path / "bad"), *COMMON]
    _one_line_error(_in_process([*args, "--lora.target-modules", "c_atn"], capfd), "closest module names: c_attn")
    _one_line_error(_in_process([*args, "--lora.r", "0"], capfd), "rank r must be a positive integer")
    _one_line_error(_in_process([*args, "--lora.dropout", "1.0"], capfd), "dropout must be in [0, 1)")
    _one_line_error(_in_process(["--data", str(text), "--run.out-dir", str(tmp_path / "bad")], capfd),
                    "no base model")
    assert not (tmp_path / "bad").exists()


def test_skip2lora_finetune_end_to_end_with_disk_skip_cache(setup: tuple[Path, Path], tmp_path: Path) -> None:
    from legolm.adapters.skip2lora import load_skip2lora

    base, text = setup
    run = tmp_path / "run"
    # more than two epochs (12 steps each): later ones read the cache
    args = ["--method", "skip2lora", "--model", str(base), "--data", str(text), "--skip2lora.block-indices", "0", "1",
            "--skip2lora.r", "4", "--skip2lora.alpha", "8", "--skip2lora.lora-head", "--skip-cache.storage", "disk",
            "--skip-cache.dtype", "float32", "--skip-cache.dir", str(tmp_path / "cache"), "--run.out-dir", str(run),
            *COMMON, *THREE_DOCUMENTS, "--max-steps", "26"]
    res = _run(args)
    assert res.returncode == 0, res.stderr
    assert "block   0: A (4, 32), B (32, 4): 256" in res.stdout  # 2 · 4 · 32 per adapter
    # One count, printed twice: the Skip2-LoRA report and the training loop. Trainable: 2 adapters of 256 and the
    # head LoRA 4·32 + 50,257·4 = 201,156. Total: the base (50,257·32 + 128·32 + 2 blocks of 12,704 + final norm 64
    # = 1,637,792; tied head) plus the 201,668 trainable ones, the head LoRA once.
    assert "lm_head LoRA: 201,156" in res.stdout
    assert "trainable 201,668 of 1,839,460 parameters" in res.stdout
    assert "training 201,668 of 1,839,460 parameters" in res.stdout
    assert "Skip-Cache: " in res.stdout and "on disk" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["after"]["ppl"] < 0.97 * summary["before"]["ppl"]
    assert len(summary["epochs"]) >= 2 and all(e["train_seconds"] > 0 for e in summary["epochs"])
    assert (tmp_path / "cache" / "features.bin").is_file()
    loaded = load_skip2lora(legolm.load_pretrained(base), run / "adapter").eval()
    x = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (loaded(x) - legolm.load_pretrained(base)(x)).abs().max() > 1e-3  # the adapters trained


def test_skip2lora_head_grad_low_rank_and_chain_train_the_same_model(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """The adapters' gradients at their rank (R = 2 taps x r 4 = 8 <= n_embd 32 / 4: what auto takes) and
    through the head-input gradient are the same gradients, so two runs end at the same held-out perplexity
    (fp32, CPU: only the rounding of the two orders differs); later epochs read the Skip-Cache in RAM."""
    base, text = setup
    ppl = {}
    for head_grad in ("low-rank", "chain"):
        run = tmp_path / head_grad
        res = _run(["--method", "skip2lora", "--model", str(base), "--data", str(text), "--skip2lora.block-indices",
                    "0", "1", "--skip2lora.r", "4", "--skip2lora.alpha", "8", "--skip-cache.storage", "cpu",
                    "--head-grad", head_grad, "--run.out-dir", str(run), *COMMON, *THREE_DOCUMENTS,
                    "--max-steps", "36"])
        assert res.returncode == 0, res.stderr
        summary = json.loads((run / "summary.json").read_text())
        assert summary["after"]["ppl"] < 0.97 * summary["before"]["ppl"]
        ppl[head_grad] = summary["after"]["ppl"]
    assert ppl["low-rank"] == pytest.approx(ppl["chain"], rel=1e-6)  # 6e-12 measured; an error of 5% in one
    # row of db, mixed into the next (db[1] += 0.05 db[0]), moved it by 3e-5 (as over 30 steps of 29 per epoch)


def test_skip2lora_bad_block_indices_exit_2(setup: tuple[Path, Path], tmp_path: Path,
                                           capfd: pytest.CaptureFixture[str]) -> None:
    base, text = setup
    res = _in_process(["--method", "skip2lora", "--model", str(base), "--data", str(text), "--skip2lora.block-indices",
                       "5", "--run.out-dir", str(tmp_path / "run"), *COMMON], capfd)
    _one_line_error(res, "out of range")
    assert not (tmp_path / "run").exists()
    res = _in_process(["--method", "skip2lora", "--model", str(base), "--data", str(text), "--skip2lora.block-indices",
                       "0", "--skip2lora.lora-head", "--head-grad", "low-rank", "--run.out-dir", str(tmp_path / "run"),
                       *COMMON], capfd)
    _one_line_error(res, "head_grad low-rank needs a frozen LM head")
    assert not (tmp_path / "run").exists()

"""Bad input, table-driven: each case exits 2 with one ``legolm: error:`` line, no traceback, nothing written.

Every case runs the real command line (`legolm.cli.main.main`) on a tiny real model (a Pythia-style
model saved with a BPE trained on Tiny Shakespeare) or a tiny pretraining run, from a scratch
folder whose contents are compared before and after.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from legolm.checkpoints.native import save_checkpoint
from legolm.cli.main import main
from legolm.core.config import ModelConfig
from legolm.data.tokenized import DataConfig, TokenizedCorpus, prepare_corpus
from legolm.model.transformer import TransformerLM
from legolm.train.run_dir import MARKER


@dataclass
class Ctx:
    """Paths a case may use; ``work`` is the current folder and the one compared before/after."""

    work: Path
    model: Path
    cache: Path
    env: dict[str, str] = field(default_factory=dict)  # environment variables the case sets

    def file(self, name: str, data: bytes | str) -> str:
        path = self.work / "inputs" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(path)

    def model_with(self, name: str, edit: Callable[[dict], object]) -> str:
        """A copy of the tiny model whose legolm.json ``edit`` changes (in place)."""
        out = self.work / "inputs" / name
        shutil.copytree(self.model, out)
        cfg = json.loads((out / "legolm.json").read_text())
        edit(cfg)
        (out / "legolm.json").write_text(json.dumps(cfg))
        return str(out)

    def hf_export(self, name: str, **changes: object) -> str:
        """The tiny model exported in Hugging Face format, its config.json changed by ``changes``."""
        from legolm.checkpoints.loader import load_pretrained
        from legolm.checkpoints.native import export_hf

        out = export_hf(load_pretrained(self.model), self.work / "inputs" / name)
        cfg = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**cfg, **changes}))
        return str(out)

    def hf_dir(self, name: str, config: bytes | str) -> str:
        out = self.work / "inputs" / name
        out.mkdir(parents=True)
        (out / "config.json").write_bytes(config.encode() if isinstance(config, str) else config)
        return str(out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[TokenizedCorpus, Path]:
    cache = tmp_path_factory.mktemp("tokenized")
    return prepare_corpus(DataConfig(source="tinyshakespeare", tokenizer="bpe:512", max_documents=20,
                                     cache_dir=str(cache)), progress=False), cache


@pytest.fixture(scope="module")
def tiny_model_dir(corpus: tuple[TokenizedCorpus, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig.from_name("tiny-pythia", vocab_size=512))
    return save_checkpoint(model, tmp_path_factory.mktemp("model") / "tiny", corpus[0].tokenizer)


def pretrain(c: Ctx, *extra: str) -> list[str]:
    return ["pretrain", "--data.source", "tinyshakespeare", "--data.max-documents", "20", "--data.tokenizer",
            "bpe:512", "--data.cache-dir", str(c.cache), "--model.preset", "tiny-pythia", "--window", "32",
            "--batch-size", "8", "--max-steps", "4", "--run.device", "cpu", "--run.out-dir", str(c.work / "run"),
            "--no-run.progress", "--no-run.plot", *extra]


def generate(c: Ctx, *extra: str, model: str | None = None) -> list[str]:
    return ["generate", "--model", model or str(c.model), "--prompt", "ROMEO:", "--max-new-tokens", "2",
            "--device", "cpu", *extra]


def _inf_weights(c: Ctx) -> str:
    from safetensors.torch import load_file, save_file

    out = c.work / "inputs" / "inf-model"
    shutil.copytree(c.model, out)
    state = load_file(str(out / "model.safetensors"))
    first = next(k for k, v in state.items() if v.dim() == 2 and "blocks.0" in k)
    state[first][0, 0] = float("inf")
    save_file(state, str(out / "model.safetensors"))
    return str(out)


def _integer_weights(c: Ctx, hf: bool) -> str:
    """The tiny model (legolm or Hugging Face layout) with its weights stored as int32."""
    from safetensors.torch import load_file, save_file

    out = Path(c.hf_export("int-hf")) if hf else Path(c.model_with("int", lambda d: None))
    state = {k: (v * 100).to(torch.int32) for k, v in load_file(str(out / "model.safetensors")).items()}
    save_file(state, str(out / "model.safetensors"))
    if hf:
        shutil.copy(c.model / "tokenizer.json", out)
    return str(out)


def _marked_folder(c: Ctx, name: str, cwd: str | None = None, relative: bool = False) -> str:
    """A folder ``name`` in the work folder carrying legolm's run marker (``cwd``: then move into that subfolder)."""
    out = c.work / name
    out.mkdir()
    (out / MARKER).write_text("")
    if cwd is not None:
        (c.work / cwd).mkdir(parents=True, exist_ok=True)
        os.chdir(c.work / cwd)
    return name if relative else str(out)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALIAS_BOMB = "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b]\n"

# (id, argv from the context, a fragment the error line must hold)
CASES: list[tuple[str, Callable[[Ctx], list[str]], str]] = [
    # optimizer, seeds, devices, sampling: checked before the run directory exists
    ("lr-nan", lambda c: pretrain(c, "--optim.lr", "nan"), "NaN is no setting"),
    ("lr-inf", lambda c: pretrain(c, "--optim.lr", "inf"), "optim.lr must be > 0 and finite"),
    ("eps-zero", lambda c: pretrain(c, "--optim.eps", "0"), "optim.eps must be > 0"),
    ("eps-negative", lambda c: pretrain(c, "--optim.eps=-1e-8"), "optim.eps must be > 0"),
    ("weight-decay-inf", lambda c: pretrain(c, "--optim.weight-decay", "inf"), "optim.weight_decay must be >= 0"),
    ("on-nonfinite-typo", lambda c: pretrain(c, "--optim.on-nonfinite", "ignore"), "expected one of stop|skip"),
    ("max-skipped-negative", lambda c: pretrain(c, "--optim.max-skipped-steps", "-1"), "max_skipped_steps must be"),
    ("seed-negative", lambda c: pretrain(c, "--run.seed", "-1"), "run.seed must be in [0, 4294967295]"),
    ("seed-huge", lambda c: pretrain(c, "--run.seed", str(2**64)), "run.seed must be in"),
    ("split-seed-negative", lambda c: pretrain(c, "--data.split-seed", "-3"), "split_seed must be >= 0"),
    ("run-device-banana", lambda c: pretrain(c, "--run.device", "banana"), "'banana' is not a device"),
    ("sample-temperature-nan", lambda c: pretrain(c, "--sample.temperature", "nan"), "NaN is no setting"),
    ("sample-temperature-zero", lambda c: pretrain(c, "--sample.temperature", "0"), "sample.temperature must be > 0"),
    ("sample-seed-negative", lambda c: pretrain(c, "--sample.seed", "-1"), "sample.seed must be in"),
    ("width-not-divisible", lambda c: pretrain(c, "--model.n-embd", "65"), "not divisible by n_head"),
    ("huge-context", lambda c: pretrain(c, "--model.block-size", str(2**40)), "block_size must be in"),
    ("many-layers", lambda c: pretrain(c, "--model.layers", *["pythia"] * 2000), "layers exceed the limit"),
    ("weights-beyond-memory", lambda c: pretrain(c, "--model.layers", *["pythia"] * 8, "--model.n-embd", "65536",
                                                 "--model.n-head", "16", "--model.intermediate-size", "65536"),
     "parameters need"),
    ("lego-num-layers-huge", lambda c: ["lego", "--config", str(CONFIGS / "lego-tiny.yaml"), "--lego.num-layers",
                                        "100000", "--run.out-dir", str(c.work / "run")], "exceeds the limit of 1,024"),
    ("lego-phase2-lr-inf", lambda c: ["lego", "--config", str(CONFIGS / "lego-tiny.yaml"), "--phase2.optim.lr", "inf",
                                      "--run.out-dir", str(c.work / "run")], "phase2.optim.lr must be > 0 and finite"),
    # config files
    ("yaml-not-utf8", lambda c: pretrain(c, "--config", c.file("a.yaml", b"optim:\n  lr: \xff\xfe\n")), "not UTF-8"),
    ("yaml-alias-bomb", lambda c: pretrain(c, "--config", c.file("bomb.yaml", ALIAS_BOMB)), "aliases"),
    ("yaml-too-deep", lambda c: pretrain(c, "--config", c.file("deep.yaml", "[" * 5000 + "]" * 5000)),
     "nests too deeply"),
    ("yaml-typo", lambda c: pretrain(c, "--config", c.file("typo.yaml", "optim:\n  lrr: 0.1\n")),
     "did you mean optim.lr"),
    ("rank-pattern-unclosed", lambda c: ["finetune", "--model", str(c.model), "--lora.rank-pattern", "[1,2"],
     "expected dict"),
    ("rank-pattern-string-rank", lambda c: ["finetune", "--model", str(c.model), "--lora.rank-pattern", "{q: abc}"],
     "expected int"),
    ("lora-rank-huge", lambda c: ["finetune", "--model", str(c.model), "--data", "tinyshakespeare",
                                  "--data.max-documents", "20", "--lora.r", "1000000000", "--run.device", "cpu",
                                  "--run.out-dir", str(c.work / "ft")], "exceeds its smaller side"),
    ("skip2lora-rank-huge", lambda c: ["finetune", "--model", str(c.model), "--method", "skip2lora",
                                       "--skip2lora.block-indices", "0", "1", "--skip2lora.r", "1000000000",
                                       "--data", "tinyshakespeare", "--data.max-documents", "20", "--run.device",
                                       "cpu", "--run.out-dir", str(c.work / "ft")], "exceeds the model width 64"),
    # the run directory
    ("overwrite-cwd", lambda c: [*pretrain(c), "--run.out-dir", ".", "--overwrite"],
     "the current directory or one above it"),
    ("overwrite-parent", lambda c: [*pretrain(c), "--run.out-dir", _marked_folder(c, "parent", cwd="parent/sub"),
                                    "--overwrite"], "the current directory or one above it"),
    ("overwrite-foreign", lambda c: [*pretrain(c), "--run.out-dir", str(Path(c.file("thesis/ch1.tex", "mine")).parent),
                                     "--overwrite"], "is not a legolm run directory"),
    ("overwrite-input", lambda c: [*pretrain(c), "--run.out-dir", _marked_folder(c, "old"), "--data.source",
                                   c.file("../old/text.txt", "Some text. " * 300), "--overwrite"],
     "an input of this command"),
    ("legolm-data-missing", lambda c: _env(c, LEGOLM_DATA="../no-such-shared") or pretrain(
        c, "--data.max-documents", "21"), "LEGOLM_DATA=../no-such-shared does not exist"),
    ("out-dir-is-a-file", lambda c: [*pretrain(c), "--run.out-dir", c.file("plain.txt", "x")], "is a file"),
    # models and their files
    ("generate-device-banana", lambda c: generate(c, "--device", "banana"), "'banana' is not a device"),
    ("generate-temperature-nan", lambda c: generate(c, "--temperature", "nan"), "NaN is no setting"),
    ("generate-seed-negative", lambda c: generate(c, "--seed", "-1"), "seed must be in [0, 2**64 - 1]"),
    ("generate-prompt-not-utf8", lambda c: [*generate(c)[:4], "caf\udce9", *generate(c)[5:]], "not valid UTF-8"),
    ("missing-local-model", lambda c: generate(c, model=_marked_folder(c, "runs", relative=True) + "/nope"),
     "model path runs/nope does not exist"),
    ("legolm-config-typo", lambda c: generate(c, model=c.model_with("typo", lambda d: d.update(activation="gleu"))),
     "activation must be one of"),
    ("legolm-config-norm-eps-nan",
     lambda c: generate(c, model=c.model_with("eps", lambda d: d.update(norm_eps=float("nan")))),
     "norm_eps must be > 0 and finite"),
    ("legolm-config-string-eos", lambda c: generate(c, model=c.model_with("eos", lambda d: d.update(eos_token_id="2"))),
     "eos_token_id must be an integer"),
    ("hf-config-a-list", lambda c: generate(c, model=c.hf_dir("list", "[1, 2]")), "must hold a JSON object"),
    ("legolm-config-a-list", lambda c: generate(c, model=_legolm_config(c, "[1, 2]")), "must hold a JSON object"),
    ("legolm-config-not-utf8", lambda c: generate(c, model=_legolm_config(c, b"{\"name\": \"\xe9\"}")),
     "not UTF-8"),
    ("legolm-config-sizes-not-the-weights",
     lambda c: generate(c, model=c.model_with("wide", lambda d: d.update(n_embd=128, vocab_size=1 << 24))),
     "legolm.json does not match the weights"),
    ("hf-heads-do-not-split-the-weights", lambda c: generate(c, model=c.hf_export("heads", num_attention_heads=2,
                                                                                  hidden_size=32)),
     "does not fit a gpt_neox model of n_head=2"),
    ("hf-context-2-40", lambda c: generate(c, model=c.hf_export("ctx", max_position_embeddings=2**40)),
     "block_size must be in"),
    ("hf-config-not-utf8", lambda c: generate(c, model=c.hf_dir("latin", b"{\"n_embd\": \"\xe9\"}")), "not UTF-8"),
    ("hf-config-string-size", lambda c: generate(c, model=c.hf_dir("str", json.dumps(
        {"model_type": "gpt2", "n_layer": 1, "n_embd": "64", "n_head": 4, "vocab_size": 512, "n_positions": 64}))),
     "n_embd must be an integer"),
    ("legolm-integer-weights", lambda c: generate(c, model=_integer_weights(c, hf=False)),
     "holds int32 values, not floating point"),
    ("hf-integer-weights", lambda c: generate(c, model=_integer_weights(c, hf=True)),
     "holds int32 values, not floating point"),
    ("tokenizer-json-garbage", lambda c: generate(c, model=_garbage_tokenizer(c)), "is not a valid tokenizer file"),
    ("tokenizer-json-empty", lambda c: generate(c, model=_garbage_tokenizer(c, "")), "is not a valid tokenizer file"),
    ("tokenizer-json-wrong-schema", lambda c: generate(c, model=_garbage_tokenizer(c, '{"model": {"type": "BPE", '
                                                                                      '"vocab": [1, 2]}}')),
     "is not a valid tokenizer file"),
    ("hf-config-too-deep", lambda c: generate(c, model=c.hf_dir("deep", '{"a": ' * 100_000 + "1" + "}" * 100_000)),
     "nests too deeply"),
    ("hf-config-float-size", lambda c: generate(c, model=c.hf_export("float", hidden_size=64.0)),
     "n_embd must be an integer, got 64.0"),
    ("hf-config-heads-do-not-divide", lambda c: generate(c, model=c.hf_export("heads3", num_attention_heads=3)),
     "n_embd=64 is not divisible by n_head=3"),
    ("hf-config-string-eos", lambda c: generate(c, model=c.hf_export("eos-hf", eos_token_id="x")),
     "eos_token_id must be an integer or null"),
    ("eval-ids-beyond-vocab", lambda c: ["eval", "ppl", "--model", str(c.model), "--data",
                                         c.file("story.txt", "Once upon a time there was a cat. " * 40),
                                         "--tokenizer", "gpt2", "--max-length", "32", "--stride", "32",
                                         "--device", "cpu"], "but the model has only 512 embedding rows"),
    ("eval-json-is-a-folder", lambda c: ["eval", "ppl", "--model", str(c.model), "--data", "tinyshakespeare",
                                         "--json", str(Path(c.file("json/x", "")).parent), "--max-length", "32",
                                         "--stride", "32", "--device", "cpu"], "is a folder"),
    ("export-out-is-a-file", lambda c: ["export", "--model", str(c.model), "--out", c.file("out.bin", "x"),
                                        "--overwrite"], "is a file"),
    ("export-out-is-the-input", lambda c: ["export", "--model", c.model_with("in", lambda d: None),
                                           "--out", str(c.work / "inputs" / "in"), "--overwrite"],
     "an input of this command"),
    ("export-out-foreign", lambda c: ["export", "--model", str(c.model), "--out",
                                      c.file("notes/a.txt", "mine").rsplit("/", 1)[0], "--overwrite"],
     "is not a checkpoint folder"),
    ("analyze-nonfinite", lambda c: ["analyze", "rank", "--base", str(c.model), "--tuned", _inf_weights(c)],
     "holds NaN/inf values"),
]


def _env(c: Ctx, **values: str) -> None:
    """Set environment variables for the case (the test restores them)."""
    c.env.update(values)


def _legolm_config(c: Ctx, text: bytes | str) -> str:
    out = c.model_with("raw", lambda d: None)
    Path(out, "legolm.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return out


def _garbage_tokenizer(c: Ctx, text: str = "{\"model\": 42") -> str:
    out = c.model_with("tok", lambda d: None)
    Path(out, "tokenizer.json").write_text(text)
    return out


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("argv", "fragment"), [(a, f) for _, a, f in CASES], ids=[i for i, _, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv: Callable[[Ctx], list[str]], fragment: str,
                                                         corpus: tuple[TokenizedCorpus, Path], tiny_model_dir: Path,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    ctx = Ctx(work, tiny_model_dir, corpus[1])
    args = argv(ctx)
    for name, value in ctx.env.items():
        monkeypatch.setenv(name, value)
    before = _snapshot(work)
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("legolm: error:")]
    assert code == 2, err
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    assert fragment in errors[0], errors[0]
    assert _snapshot(work) == before, "bad input wrote or removed files"
    assert not (work / "run").exists() and not (work / "ft").exists()

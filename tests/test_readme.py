"""The README's Python blocks run as written, and its two fresh-machine commands are the ones CI runs.

Blocks preceded by ``<!-- readme-test: skip (...) -->`` are sketches that need the reader's own
data or a trained model; every other ``python`` block is executed, in order, in one namespace,
from a folder that has the shared data beside it as ``../shared`` (as a checkout does).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
from pathlib import Path

import pytest

import legolm

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = "<!-- readme-test: skip"
FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks(text: str) -> list[tuple[str, bool]]:
    """(code, runnable) of every ```python block, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        blocks.append((match.group(1), not before.startswith(SKIP)))
    return blocks


def test_the_readme_has_runnable_python_and_marks_every_sketch() -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks and blocks[0][1], "the README's first Python block (Use) must run as written"
    assert len(blocks) == README.read_text(encoding="utf-8").count("```python")


def test_readme_python_blocks_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             smollm2_gguf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared = Path(os.environ["LEGOLM_DATA"])
    (tmp_path / "shared").symlink_to(shared, target_is_directory=True)
    work = tmp_path / "checkout"
    work.mkdir()
    monkeypatch.chdir(work)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    runnable = [code for code, ok in python_blocks(README.read_text(encoding="utf-8")) if ok]
    for code in runnable:
        exec(compile(code, str(README), "exec"), namespace)  # the README is ours
    assert capsys.readouterr().out.strip(), "the Use block prints a generated continuation"
    # What the block saved is what `legolm generate --model runs/ckpt` needs: weights and the tokenizer.
    again = legolm.load_tokenizer(work / "runs" / "ckpt")
    assert again.encode("Once upon a time") == legolm.load_tokenizer(smollm2_gguf).encode("Once upon a time")
    assert (work / "runs" / "hf" / "config.json").is_file()


def _readme_bash(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)\n^```$", text, flags=re.MULTILINE | re.DOTALL)


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    test_cmd = next(c for c in _readme_bash(README.read_text(encoding="utf-8")) if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_cmd in ci, "README's test command differs from .ci/run's"
    assert "LEGOLM_DATA" not in test_cmd  # works as written: tests/conftest.py finds ../shared itself
    assert shlex.split(test_cmd)[0] == "python3"


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


def _readme_commands(text: str) -> list[str]:
    """Every `legolm` command line of the README: in its bash blocks (continuation lines joined, comments and
    other commands of an ``&&`` chain dropped) and in inline code."""
    commands = []
    for block in _readme_bash(text):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("#", 1)[0].split("&&"):
                words = part.split()
                start = next((i for i, w in enumerate(words) if w.endswith(("legolm", "legolm.cli.main", "legolm)"))
                              and not (i and words[i - 1].startswith("--"))), None)  # not a flag's value
                if start is not None:
                    commands.append(" ".join(words[start + 1:]))
    commands += [m.group(1) for m in re.finditer(r"`legolm ([^`]+)`", text)]
    return commands


def test_every_readme_command_names_a_real_subcommand_and_real_flags() -> None:
    """The README's commands use the CLI that exists: each subcommand, and each ``--flag`` (also those shown as
    optional ``[--x ...]``), is one the parser knows."""
    from legolm.cli.main import build_parser

    commands = _readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) > 10
    root = build_parser()
    for command in commands:
        words = command.replace("[", " ").replace("]", " ").replace("|", " ").split()
        parser = root
        while words and (sub := _subparser(parser, words[0])) is not None:
            parser, words = sub, words[1:]
        assert parser is not root, f"README: `legolm {command}` names no subcommand"
        known = {s for action in parser._actions for s in action.option_strings}
        for flag, value in itertools.pairwise(words):
            if flag == "--config" and value.startswith("configs/"):
                assert (ROOT / value).is_file(), f"README: `legolm {command}` names a config that does not exist"
        for word in words:
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and flag != "--" and flag.rstrip(".") not in known:
                raise AssertionError(f"README: `legolm {command}` uses {flag}, which `{parser.prog}` does not take")

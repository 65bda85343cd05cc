"""The README's Python blocks run as written, and its two fresh-machine commands are the ones CI runs.

Blocks preceded by ``<!-- readme-test: skip (...) -->`` are sketches that need the reader's own
data or a trained model; every other ``python`` block is executed, in order, in one namespace,
from a folder that has the shared data beside it as ``../shared`` (as a checkout does).
"""

from __future__ import annotations

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

"""Shared fixtures: where the real data lives, and the real SmolLM2 GGUF model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the fused decode kernels run in Triton's CPU interpreter (before it is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_the_language_once_per_launch() -> None:
    """Triton's interpreter patches ``triton.language`` for the interpreter when a kernel launches (undone when it
    returns), and again at every call of a ``@triton.jit`` device function inside it: the same patch, over the same
    modules, each time an ``inspect.getmembers`` walk of them. In the decode kernels that is thousands of calls per
    launch and about half the interpreter's time. Here a device function called inside a launch whose patch already
    covers its modules skips the repeat; every other call (a launch, a device function reaching a module the launch
    did not patch) patches as before. Nothing the kernels compute changes. Triton versions without these internals
    are left alone."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang, scope_type = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    tl = getattr(interpreter, "tl", None)
    if patch_lang is None or scope_type is None or tl is None:
        return
    active: list[set[int]] = []  # the modules the running launch patched (a launch never nests in another)

    def modules(fn: object) -> set[int]:
        return {id(v) for v in getattr(fn, "__globals__", {}).values() if v is tl or v is tl.core}

    def once(fn: object) -> object:
        langs = modules(fn)
        if active and langs and langs <= active[0]:
            return scope_type()  # already patched for this launch: an empty scope, nothing to restore
        scope = patch_lang(fn)
        if not active:
            active.append(langs)
            restore = scope.restore

            def restore_and_end() -> None:
                active.clear()
                restore()

            scope.restore = restore_and_end
        return scope

    interpreter._patch_lang = once


_patch_the_language_once_per_launch()

DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared"
SMOLLM2_GGUF = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE = "data/tinyshakespeare.txt"


def _resolve_shared_env() -> None:
    """Export LEGOLM_DATA once as an absolute path (the `shared` folder beside the checkout when unset), so
    the library and every subprocess (some run from a temporary folder) find the same real data."""
    raw = os.environ.get("LEGOLM_DATA")
    path = (Path(raw).expanduser() if raw else DEFAULT_SHARED).resolve()
    if path.is_dir():
        os.environ["LEGOLM_DATA"] = str(path)


_resolve_shared_env()


@pytest.fixture(autouse=True, scope="session")
def _torch_defaults() -> None:
    # 2 CPU cores on CI: keep torch from oversubscribing, and keep tests deterministic.
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Downloads, tokenized corpora and Skip-Caches of this test session go to a fresh folder (one per
    xdist worker): tests never read the user's cache, and parallel workers never share one."""
    os.environ["LEGOLM_CACHE"] = str(tmp_path_factory.mktemp("legolm_cache"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The project's shared real data: $LEGOLM_DATA, else the `shared` folder beside the checkout."""
    raw = os.environ.get("LEGOLM_DATA")
    path = Path(raw).expanduser() if raw else DEFAULT_SHARED
    path = path.resolve()
    if not path.is_dir():
        how = f"LEGOLM_DATA={raw!r}" if raw else f"LEGOLM_DATA is unset and the default {DEFAULT_SHARED}"
        pytest.fail(
            f"shared data folder not found: {how} does not exist. Set LEGOLM_DATA to the folder holding "
            "models/ and data/ (CI uses LEGOLM_DATA=../shared).",
            pytrace=False,
        )
    return path


def _shared_file(shared_dir: Path, rel: str) -> Path:
    path = shared_dir / rel
    if not path.is_file():
        pytest.fail(f"{path} is missing from the shared data folder {shared_dir} (LEGOLM_DATA)", pytrace=False)
    return path


@pytest.fixture(scope="session")
def smollm2_gguf(shared_dir: Path) -> Path:
    """The real SmolLM2-135M-Instruct model, 4-bit GGUF."""
    return _shared_file(shared_dir, SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def shakespeare_text(shared_dir: Path) -> str:
    return _shared_file(shared_dir, SHAKESPEARE).read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(shared_dir: Path) -> Path:
    """GPT-2's vocab.json + merges.txt (50,257 tokens)."""
    d = shared_dir / "tokenizers" / "gpt2"
    _shared_file(shared_dir, "tokenizers/gpt2/vocab.json")
    _shared_file(shared_dir, "tokenizers/gpt2/merges.txt")
    return d

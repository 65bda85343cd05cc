"""Tokenize real text (Tiny Shakespeare, the TinyStories sample) for the GPU benchmarks into .bench/.

The GPU machine gets the checkout only, not the shared data folder: this writes small token
arrays that travel with ``carry=[".bench"]``.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np

from benchmarks.common import BENCH_DATA, ROOT
from legolm.data.sources import shared_path
from legolm.data.tokenizer import Tokenizer

# name in .bench/ -> shared text file (TinyStories: more distinct batches for the pretraining benchmark)
TEXTS = {"tinyshakespeare": "data/tinyshakespeare.txt", "tinystories": "data/tinystories/tinystories_sample_2MB.txt"}


# LEGO benchmarks: the Gutenberg novels held out by book, tokenized with a BPE trained on the training
# books (the grown model) and with SmolLM2's own tokenizer (the pretrained split), each stored as a
# `load_tokenized` folder (train/val arrays + tokenizer) that needs no source text.
SMOLLM2 = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
LEGO_CORPORA = {"lego-gutenberg-bpe4096": {"source": "gutenberg", "tokenizer": "bpe:4096"},
                "lego-gutenberg-smollm2": {"source": "gutenberg", "tokenizer": SMOLLM2}}
# The GPU machine takes at most 64 MiB per call: the SmolLM2 GGUF (98 MB) travels in two calls, as
# two halves in two carried folders, joined there (`python -m benchmarks.prepare_data --join`).
MODEL_PARTS = (ROOT / ".xfer1" / "smollm2.part1", ROOT / ".xfer2" / "smollm2.part2")
MODEL_TARGET = BENCH_DATA / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_lego_corpora() -> None:
    import shutil
    import tempfile

    from legolm.data.tokenized import DataConfig, prepare_corpus

    for name, spec in LEGO_CORPORA.items():
        tok = str(shared_path(spec["tokenizer"])) if spec["tokenizer"].endswith(".gguf") else spec["tokenizer"]
        with tempfile.TemporaryDirectory() as tmp:
            corpus = prepare_corpus(DataConfig(source=spec["source"], tokenizer=tok, cache_dir=tmp), progress=False)
            assert corpus.directory is not None
            target = BENCH_DATA / name
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(corpus.directory, target)
            print(f"{name}: {len(corpus.train):,} train / {len(corpus.val):,} val tokens -> {target}")


def split_model() -> None:
    """The SmolLM2 GGUF in two halves (one per GPU call), with its sha256 for the join."""
    data = shared_path(SMOLLM2).read_bytes()
    half = len(data) // 2
    for part, chunk in zip(MODEL_PARTS, (data[:half], data[half:]), strict=True):
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(chunk)
    (MODEL_PARTS[1].parent / "sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    print(f"{SMOLLM2}: {len(data):,} bytes -> {MODEL_PARTS[0]} + {MODEL_PARTS[1]}")


def join_model() -> None:
    """On the GPU machine: the two halves back into one GGUF under .bench/models/, checked."""
    missing = [str(p) for p in MODEL_PARTS if not p.is_file()]
    if missing:
        raise SystemExit(f"missing {missing}: carry .xfer1 in one call and .xfer2 in the next on a warm machine")
    data = MODEL_PARTS[0].read_bytes() + MODEL_PARTS[1].read_bytes()
    want = (MODEL_PARTS[1].parent / "sha256").read_text().strip()
    if hashlib.sha256(data).hexdigest() != want:
        raise SystemExit("the joined SmolLM2 GGUF does not match its sha256")
    MODEL_TARGET.parent.mkdir(parents=True, exist_ok=True)
    MODEL_TARGET.write_bytes(data)
    print(f"joined {MODEL_TARGET} ({len(data):,} bytes, sha256 ok)")


# texts the GPU machine reads as the shared-data folder (LEGOLM_DATA=.bench/shared): `legolm lct` (Tiny
# Shakespeare, Gutenberg), the second Skip2-LoRA base's pretraining (TinyStories), serve (GPT-2's tokenizer)
SHARED_COPIES = ["data/tinyshakespeare.txt", "data/gutenberg/gutenberg_26_novels.txt",
                 "data/tinystories/tinystories_sample_2MB.txt", "tokenizers/gpt2/vocab.json",
                 "tokenizers/gpt2/merges.txt"]


def copy_shared() -> None:
    import shutil

    for rel in SHARED_COPIES:
        target = BENCH_DATA / "shared" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_path(rel), target)
        print(f"{rel} -> {target}")


def main() -> None:
    if "--join" in sys.argv:
        join_model()
        return
    BENCH_DATA.mkdir(exist_ok=True)
    copy_shared()
    prepare_lego_corpora()
    split_model()
    for corpus, rel in TEXTS.items():
        text = shared_path(rel).read_text()
        for name in ("gpt2", "pythia"):
            tok = Tokenizer.from_dir(shared_path(f"tokenizers/{name}"))
            ids = np.array(tok.encode(text), dtype=np.uint16)
            np.save(BENCH_DATA / f"{corpus}_{name}.npy", ids)
            print(f"{corpus} {name}: {len(ids):,} tokens -> {BENCH_DATA / f'{corpus}_{name}.npy'}")


if __name__ == "__main__":
    main()

"""Tokenize real text (Tiny Shakespeare, the TinyStories sample) for the GPU benchmarks into .bench/.

The GPU machine gets the checkout only, not the shared data folder: this writes small token
arrays that travel with ``carry=[".bench"]``.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import BENCH_DATA
from legolm.data.sources import shared_path
from legolm.data.tokenizer import Tokenizer

# name in .bench/ -> shared text file (TinyStories: more distinct batches for the pretraining benchmark)
TEXTS = {"tinyshakespeare": "data/tinyshakespeare.txt", "tinystories": "data/tinystories/tinystories_sample_2MB.txt"}


# LEGO benchmark: TinyStories split by story and tokenized with a BPE trained on its train split,
# stored as a `load_tokenized` folder (train/val arrays + tokenizer) that needs no source text.
LEGO_CORPUS = {"source": "tinystories", "tokenizer": "bpe:4096"}


def prepare_lego_corpus() -> None:
    import shutil
    import tempfile

    from legolm.data.tokenized import DataConfig, prepare_corpus

    with tempfile.TemporaryDirectory() as tmp:
        corpus = prepare_corpus(DataConfig(**LEGO_CORPUS, cache_dir=tmp), progress=False)
        assert corpus.directory is not None
        target = BENCH_DATA / "lego-tinystories-bpe4096"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(corpus.directory, target)
        print(f"lego corpus: {len(corpus.train):,} train / {len(corpus.val):,} val tokens -> {target}")


# texts the GPU machine reads as the shared-data folder (LEGOLM_DATA=.bench/shared), e.g. `legolm lct`
SHARED_COPIES = ["data/tinyshakespeare.txt", "tokenizers/gpt2/vocab.json", "tokenizers/gpt2/merges.txt"]  # serve: GPT-2


def copy_shared() -> None:
    import shutil

    for rel in SHARED_COPIES:
        target = BENCH_DATA / "shared" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_path(rel), target)
        print(f"{rel} -> {target}")


def main() -> None:
    BENCH_DATA.mkdir(exist_ok=True)
    copy_shared()
    prepare_lego_corpus()
    for corpus, rel in TEXTS.items():
        text = shared_path(rel).read_text()
        for name in ("gpt2", "pythia"):
            tok = Tokenizer.from_dir(shared_path(f"tokenizers/{name}"))
            ids = np.array(tok.encode(text), dtype=np.uint16)
            np.save(BENCH_DATA / f"{corpus}_{name}.npy", ids)
            print(f"{corpus} {name}: {len(ids):,} tokens -> {BENCH_DATA / f'{corpus}_{name}.npy'}")


if __name__ == "__main__":
    main()

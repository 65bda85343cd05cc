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


def main() -> None:
    BENCH_DATA.mkdir(exist_ok=True)
    for corpus, rel in TEXTS.items():
        text = shared_path(rel).read_text()
        for name in ("gpt2", "pythia"):
            tok = Tokenizer.from_dir(shared_path(f"tokenizers/{name}"))
            ids = np.array(tok.encode(text), dtype=np.uint16)
            np.save(BENCH_DATA / f"{corpus}_{name}.npy", ids)
            print(f"{corpus} {name}: {len(ids):,} tokens -> {BENCH_DATA / f'{corpus}_{name}.npy'}")


if __name__ == "__main__":
    main()

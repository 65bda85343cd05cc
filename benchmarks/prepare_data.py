"""Tokenize a slice of real text (Tiny Shakespeare) for the GPU benchmarks into .bench/.

The GPU machine gets the checkout only, not the shared data folder: this writes small token
arrays that travel with ``carry=[".bench"]``.
"""

from __future__ import annotations

import numpy as np

from benchmarks.common import BENCH_DATA
from legolm.data.sources import shared_path
from legolm.data.tokenizer import Tokenizer


def main() -> None:
    text = shared_path("data/tinyshakespeare.txt").read_text()
    BENCH_DATA.mkdir(exist_ok=True)
    for name in ("gpt2", "pythia"):
        tok = Tokenizer.from_dir(shared_path(f"tokenizers/{name}"))
        ids = np.array(tok.encode(text), dtype=np.uint16)
        np.save(BENCH_DATA / f"tinyshakespeare_{name}.npy", ids)
        print(f"{name}: {len(ids):,} tokens -> {BENCH_DATA / f'tinyshakespeare_{name}.npy'}")


if __name__ == "__main__":
    main()

"""Where real data comes from: the shared folder named by ``LEGOLM_DATA``, else the public source.

``LEGOLM_DATA`` points at a folder laid out like the project's ``shared/`` (``data/``,
``tokenizers/``, ``models/``); CI sets it to ``../shared``. Without it, known files are
downloaded once into ``~/.cache/legolm``; offline, the error names the variable to set.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from legolm.errors import LegolmError

ENV_VAR = "LEGOLM_DATA"
CACHE = Path(os.environ.get("LEGOLM_CACHE", Path.home() / ".cache" / "legolm"))

# Public homes of the shared files (the same bytes the shared folder holds).
PUBLIC = {
    "data/tinyshakespeare.txt":
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "tokenizers/gpt2/vocab.json": "https://huggingface.co/openai-community/gpt2/resolve/main/vocab.json",
    "tokenizers/gpt2/merges.txt": "https://huggingface.co/openai-community/gpt2/resolve/main/merges.txt",
    "tokenizers/pythia/tokenizer.json": "https://huggingface.co/EleutherAI/pythia-70m/resolve/main/tokenizer.json",
}


def shared_path(relative: str) -> Path:
    """Absolute path of a shared file or folder, downloading a known file when no folder is set."""
    root = os.environ.get(ENV_VAR)
    if root:
        path = Path(root).expanduser() / relative
        if not path.exists():
            raise LegolmError(f"{path} does not exist; {ENV_VAR}={root} should point at the shared data folder")
        return path
    cached = CACHE / relative
    if cached.exists():
        return cached
    files = [k for k in PUBLIC if k == relative or k.startswith(relative.rstrip("/") + "/")]
    if not files:
        raise LegolmError(f"{relative} has no public download; set {ENV_VAR} to the shared data folder")
    for key in files:
        _download(PUBLIC[key], CACHE / key)
    return cached


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        urllib.request.urlretrieve(url, tmp)
    except OSError as err:
        raise LegolmError(f"cannot download {url} ({err}); offline, set {ENV_VAR} to the shared data folder") from None
    tmp.replace(dest)

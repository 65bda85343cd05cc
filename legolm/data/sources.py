"""Where real data comes from: the shared folder named by ``LEGOLM_DATA``, else the public source.

``LEGOLM_DATA`` points at a folder laid out like the project's ``shared/`` (``data/``,
``tokenizers/``, ``models/``); CI sets it to ``../shared``. Without it, known files are
downloaded once into the cache (``$LEGOLM_CACHE``, default ``~/.cache/legolm``) with a progress
bar; offline, the error names the variable to set.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from legolm.errors import LegolmError

ENV_VAR = "LEGOLM_DATA"
CACHE_ENV_VAR = "LEGOLM_CACHE"
DOWNLOAD_CHUNK = 1 << 20  # bytes read per step of a download
DOWNLOAD_TIMEOUT_S = 60.0

# Public homes of the shared files (the same bytes the shared folder holds).
PUBLIC = {
    "data/tinyshakespeare.txt":
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "data/tinystories/tinystories_sample_2MB.txt":
        "https://raw.githubusercontent.com/gusjengis/toy-RNN/e4c7ff8bba4ff7989e69a3a816ebe4b14813b41e/"
        "data/tinystories_sample.txt",
    "tokenizers/gpt2/vocab.json": "https://huggingface.co/openai-community/gpt2/resolve/main/vocab.json",
    "tokenizers/gpt2/merges.txt": "https://huggingface.co/openai-community/gpt2/resolve/main/merges.txt",
    "tokenizers/pythia/tokenizer.json": "https://huggingface.co/EleutherAI/pythia-70m/resolve/main/tokenizer.json",
}


def cache_root() -> Path:
    """legolm's download/tokenization cache: ``$LEGOLM_CACHE``, else ``~/.cache/legolm`` (read at call time)."""
    return Path(os.environ.get(CACHE_ENV_VAR, Path.home() / ".cache" / "legolm")).expanduser()


def pin_shared_root() -> None:
    """Make a relative ``LEGOLM_DATA`` absolute in this process's environment, once, from the current folder: the
    same folder for the whole command and for any process it starts (which may run from another folder)."""
    root = os.environ.get(ENV_VAR)
    if root and not Path(root).expanduser().is_absolute() and Path(root).expanduser().is_dir():  # (a missing
        os.environ[ENV_VAR] = os.path.abspath(Path(root).expanduser())  # one stays as given, for its error line)


def shared_root() -> Path | None:
    """The folder ``LEGOLM_DATA`` names, as an absolute path (a relative one is taken from the current
    folder), or None when it is unset.

    Raises:
        LegolmError: The variable is set but names no folder.
    """
    root = os.environ.get(ENV_VAR)
    if not root:
        return None
    path = Path(root).expanduser().absolute()
    if not path.is_dir():
        raise LegolmError(f"{ENV_VAR}={root} does not exist (as {path}); point it at the shared data folder "
                          "(the one holding data/, tokenizers/ and models/), or unset it to download")
    return path


def shared_path(relative: str) -> Path:
    """Absolute path of a shared file or folder, downloading a known file when no folder is set."""
    root = shared_root()
    if root is not None:
        path = root / relative
        if not path.exists():
            raise LegolmError(f"{path} does not exist; {ENV_VAR}={root} should point at the shared data folder")
        return path
    cached = cache_root() / relative
    if cached.exists():
        return cached
    files = [k for k in PUBLIC if k == relative or k.startswith(relative.rstrip("/") + "/")]
    if not files:
        raise LegolmError(f"{relative} has no public download; set {ENV_VAR} to the shared data folder")
    for key in files:
        download(PUBLIC[key], cache_root() / key)
    return cached


def download(url: str, dest: Path) -> Path:
    """Fetch ``url`` into ``dest`` once (temp file + rename), with a tqdm progress bar.

    Raises:
        LegolmError: The download failed (offline, moved file); the message names ``LEGOLM_DATA``.
    """
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := response.read(DOWNLOAD_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise LegolmError(f"cannot download {url} ({err}); offline, set {ENV_VAR} to the shared data folder") from None
    tmp.replace(dest)
    return dest

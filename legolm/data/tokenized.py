"""Tokenized corpora: documents -> one token stream per split, stored once as memory-mapped arrays.

::

    source ─ read_documents ─ docs ─ seeded permutation ─┬─ train docs ─ encode ─ d₀ EOS d₁ EOS … ─ train.npy
                                                         └─ val docs   ─ encode ─ d₀ EOS d₁ EOS … ─ val.npy

Every document is followed by the tokenizer's EOS id; consumers cut fixed-length windows from the
joined stream, so EOS is never padding. The arrays live under
``<cache_dir>/<source>-<key>/`` with ``manifest.json`` (tokenizer fingerprint, source hash, counts
of documents / tokens / UTF-8 bytes / whitespace words per split) and the tokenizer itself; the
key hashes the source bytes, the tokenizer (its fingerprint, or the ``bpe:<n>`` spec) and the
split settings, so a re-run loads the arrays instead of tokenizing again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from legolm.core.config import ModelConfig
from legolm.data.corpus import DocSplit, ResolvedSource, read_documents, resolve_source
from legolm.data.sources import cache_root
from legolm.data.tokenizer import Tokenizer, parse_bpe_spec, resolve_tokenizer
from legolm.errors import ConfigError, LegolmError
from legolm.utils.io import atomic_dir, atomic_write_text, check_writable, read_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
ENCODE_BATCH_DOCS = 64  # documents per encode_batch call (one progress-bar step)
HASH_CHUNK = 1 << 20


@dataclass
class DataConfig:
    """Which text to train and evaluate on, and how it becomes tokens.

    Attributes:
        source: A named source (tinyshakespeare, tinystories, gutenberg, wikitext-2, ...) or .txt/.jsonl/.parquet path.
        tokenizer: gpt2, pythia, bpe:<vocab_size> (trained on the train docs), a tokenizer/model dir, .gguf or hub name.
        val_fraction: Fraction of the documents held out for validation (chosen by a seeded permutation).
        split_seed: Seed of the train/val document permutation.
        text_field: Field of .jsonl records / column of .parquet files that holds the text.
        max_documents: Use only the first N documents of the source (None: all).
        cache_dir: Where tokenized arrays are stored (None: <LEGOLM_CACHE>/tokenized).
        separator: Document separator inside .txt files (None: <|endoftext|>).
        doc_split: How .txt files split into documents: auto (the source's rule), separator, blocks, books, file.
        min_document_chars: Smallest document when blank-line blocks are grouped (doc_split=blocks).
    """

    source: str = "tinyshakespeare"
    tokenizer: str = "gpt2"
    val_fraction: float = 0.1
    split_seed: int = 0
    text_field: str = "text"
    max_documents: int | None = None
    cache_dir: str | None = None
    separator: str | None = None
    doc_split: DocSplit = "auto"
    min_document_chars: int = 10_000

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad field."""
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data: val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.max_documents is not None and self.max_documents < 2:
            raise ConfigError(f"data: max_documents must be >= 2 (one train, one val), got {self.max_documents}")
        if self.min_document_chars < 1:
            raise ConfigError(f"data: min_document_chars must be >= 1, got {self.min_document_chars}")
        if self.split_seed < 0:
            raise ConfigError(f"data: split_seed must be >= 0, got {self.split_seed}")


@dataclass
class TokenizedCorpus:
    """Train and validation token streams of one corpus, with the tokenizer that made them.

    Attributes:
        train: 1-D memmap of token ids (uint16 if the vocabulary fits, else uint32), documents joined by EOS.
        val: The same for the held-out documents.
        tokenizer: The tokenizer that made the ids.
        manifest: Provenance and counts (see the module docstring).
        eos_id: The id that ends every document.
        directory: Where the arrays are stored.
    """

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    manifest: dict[str, Any]
    eos_id: int
    directory: Path | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, name: str) -> np.ndarray:
        """``train``, ``val``, or ``all`` (train then val, a copy)."""
        if name == "all":
            return np.concatenate([self.train, self.val])
        if name not in SPLITS:
            raise ConfigError(f"unknown split {name!r}; use train, val or all")
        arr: np.ndarray = getattr(self, name)
        return arr

    def counts(self, name: str) -> dict[str, int]:
        """Documents, tokens, bytes and words of a split (``all`` sums both)."""
        names = SPLITS if name == "all" else (name,)
        per = [self.manifest["counts"][n] for n in names]
        return {k: sum(p[k] for p in per) for k in per[0]}


# -- preparing -----------------------------------------------------------------------------------------
def prepare_corpus(cfg: DataConfig, *, progress: bool = True, tokenizer: Tokenizer | None = None,
                   hold_out: bool = True) -> TokenizedCorpus:
    """Tokenize ``cfg.source`` once (or load the stored arrays) and split it by document.

    Args:
        cfg: Source, tokenizer spec, split settings.
        progress: Show a progress bar while tokenizing.
        tokenizer: An already loaded tokenizer to use instead of resolving ``cfg.tokenizer`` again
            (``cfg.tokenizer`` then only names it in the manifest).
        hold_out: Split off validation documents (``val_fraction``); False keeps every document in
            ``train`` (``val`` is empty), for scoring a whole text (even a single document).

    Raises:
        ConfigError / LegolmError: Empty corpus, no validation documents, unknown tokenizer,
            missing file, or stored data made with another tokenizer.
    """
    cfg.validate()
    source = resolve_source(cfg.source)
    bpe_size = parse_bpe_spec(cfg.tokenizer)
    if tokenizer is None and bpe_size is None:
        tokenizer = resolve_tokenizer(cfg.tokenizer)
    settings = _settings(cfg, source) if hold_out else {**_settings(cfg, source), "whole": True}
    key_parts = {**settings, "tokenizer": cfg.tokenizer if tokenizer is None else tokenizer.fingerprint()}
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "tokenized"
    directory = root / f"{_slug(source.name)}-{key}"
    if not (directory / MANIFEST).is_file():
        check_writable(root, "data.cache_dir")
        docs = _documents(cfg, source)
        train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.split_seed) if hold_out else (docs, [])
        if tokenizer is None:
            tokenizer = resolve_tokenizer(cfg.tokenizer, train_docs)
        _write(directory, {"train": train_docs, "val": val_docs}, tokenizer,
               {**settings, "tokenizer": cfg.tokenizer}, progress)
    return load_tokenized(directory, tokenizer)


def _settings(cfg: DataConfig, source: ResolvedSource) -> dict[str, Any]:
    """Everything besides the tokenizer that decides the arrays' contents."""
    fields = dataclasses.asdict(cfg)
    for unused in ("source", "tokenizer", "cache_dir"):
        fields.pop(unused)
    return {"source": cfg.source, "source_hash": source_hash(source.paths), "doc_split_used": source.doc_split,
            **fields}


def _documents(cfg: DataConfig, source: ResolvedSource) -> list[str]:
    docs = []
    for doc in read_documents(source, text_field=cfg.text_field, separator=cfg.separator, doc_split=cfg.doc_split,
                              min_document_chars=cfg.min_document_chars):
        docs.append(doc)
        if cfg.max_documents is not None and len(docs) == cfg.max_documents:
            break
    if not docs:
        raise LegolmError(f"data source {cfg.source} holds no text (empty corpus); give a file with documents")
    return docs


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out ``round(len(docs) * val_fraction)`` documents picked by a seeded permutation.

    Both splits keep the source's document order.

    Raises:
        ConfigError: The split leaves no validation or no training document.
    """
    n_val = round(len(docs) * val_fraction)
    if n_val == 0:
        raise ConfigError(f"no validation documents: {len(docs)} document(s) x val_fraction {val_fraction} "
                          "rounds to 0; raise data.val_fraction (--data.val-fraction) or use a corpus with more "
                          "documents")
    if n_val == len(docs):
        raise ConfigError(f"no training documents: val_fraction {val_fraction} holds out all {len(docs)}; lower it")
    val_idx = set(np.random.default_rng(seed).permutation(len(docs))[:n_val].tolist())
    return ([d for i, d in enumerate(docs) if i not in val_idx], [d for i, d in enumerate(docs) if i in val_idx])


def _write(directory: Path, splits: dict[str, list[str]], tokenizer: Tokenizer, settings: dict[str, Any],
           progress: bool) -> None:
    if tokenizer.eos_id is None:
        raise ConfigError(f"tokenizer {settings['tokenizer']} has no EOS token to separate documents; use another")
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    counts = {}
    with atomic_dir(directory, overwrite=True) as tmp:
        for name, docs in splits.items():
            ids = encode_documents(docs, tokenizer, tokenizer.eos_id, dtype, progress, desc=f"tokenize {name}")
            np.save(tmp / f"{name}.npy", ids)
            counts[name] = {"documents": len(docs), "tokens": int(ids.size),
                            "bytes": sum(len(d.encode("utf-8")) for d in docs),
                            "words": sum(len(d.split()) for d in docs)}
        (tmp / "tokenizer").mkdir()
        tokenizer.save(tmp / "tokenizer")
        manifest = {
            "format": FORMAT_VERSION, **settings, "tokenizer_fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "dtype": np.dtype(dtype).name,
            "counts": counts, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def encode_documents(docs: list[str], tokenizer: Tokenizer, eos_id: int, dtype: Any = np.uint32,
                     progress: bool = True, desc: str = "tokenize") -> np.ndarray:
    """``doc₀ EOS doc₁ EOS …`` as one 1-D array, batch-encoded with a progress bar (docs, tokens/s)."""
    pieces: list[np.ndarray] = []
    n_tokens = 0
    with tqdm(total=len(docs), desc=desc, unit="doc", disable=not progress) as bar:
        for start in range(0, len(docs), ENCODE_BATCH_DOCS):
            batch = tokenizer.encode_batch(docs[start:start + ENCODE_BATCH_DOCS])
            for ids in batch:
                pieces.append(np.asarray([*ids, eos_id], dtype=dtype))
                n_tokens += len(ids) + 1
            bar.update(len(batch))
            bar.set_postfix(tokens=f"{n_tokens:,}")
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


# -- loading -------------------------------------------------------------------------------------------
def load_tokenized(directory: str | Path, tokenizer: Tokenizer | None = None) -> TokenizedCorpus:
    """Open stored arrays as memmaps.

    Args:
        directory: A folder `prepare_corpus` wrote (it holds ``manifest.json``).
        tokenizer: The tokenizer the caller will use; refused unless it is the one that made the
            data (same fingerprint). None: the tokenizer stored with the data.

    Raises:
        ConfigError: The tokenizer does not match the manifest.
        LegolmError: Not a tokenized-data folder, or its arrays do not match the manifest.
    """
    directory = Path(directory)
    try:
        manifest = read_json(directory / MANIFEST)
    except LegolmError as err:
        raise LegolmError(f"{directory} is not tokenized data from prepare_corpus ({err})") from None
    # The caller's tokenizer must be the one that made the data; without one, the stored copy is used.
    tok, who = (tokenizer, "the requested tokenizer") if tokenizer else (_stored(directory), "its stored copy")
    expected = manifest["tokenizer_fingerprint"]
    if tok.fingerprint() != expected:
        raise ConfigError(
            f"tokenized data in {directory} was made with tokenizer {manifest['tokenizer']!r} (fingerprint "
            f"{expected[:12]}) but {who} has fingerprint {tok.fingerprint()[:12]}; use the data's own tokenizer "
            "or tokenize again with this one (another --tokenizer / --cache-dir)"
        )
    arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in SPLITS}
    for name, arr in arrays.items():
        if arr.size != manifest["counts"][name]["tokens"]:
            raise LegolmError(f"{directory / name}.npy holds {arr.size} tokens, the manifest says "
                              f"{manifest['counts'][name]['tokens']}; delete {directory} to tokenize again")
    return TokenizedCorpus(arrays["train"], arrays["val"], tok, manifest, int(manifest["eos_id"]), directory)


def _stored(directory: Path) -> Tokenizer:
    try:
        return Tokenizer.from_dir(directory / "tokenizer")
    except LegolmError as err:
        raise LegolmError(f"{directory} lacks its stored tokenizer ({err}); delete it to tokenize again") from None


def check_fits(corpus: TokenizedCorpus, model_config: ModelConfig, window: int) -> None:
    """Raise `ConfigError` unless the corpus can feed ``window``-token windows to this model.

    Checks: the tokenizer's ids fit the model's embedding, ``window <= block_size``, and each
    split holds at least ``window + 1`` tokens (inputs plus the shifted targets).
    """
    if corpus.vocab_size > model_config.vocab_size:
        raise ConfigError(f"tokenizer has {corpus.vocab_size} tokens but the model's embedding has "
                          f"{model_config.vocab_size} rows; use the model's tokenizer or a larger vocab_size")
    if window > model_config.block_size:
        raise ConfigError(f"window {window} exceeds the model's block_size {model_config.block_size}; "
                          f"use a window <= {model_config.block_size}")
    for name in SPLITS:
        n = len(corpus.split(name))
        if n < window + 1:
            raise ConfigError(f"the {name} split has {n} tokens, fewer than one window + 1 ({window + 1}); "
                              "use a shorter window, more documents or another val_fraction")
        check_ids(corpus.split(name), model_config.vocab_size, f"the {name} split")


def check_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    """Raise `ConfigError` when a token id of ``ids`` is not a row of a ``vocab_size``-row embedding."""
    top = int(np.max(ids)) if len(ids) else -1
    if top >= vocab_size:
        raise ConfigError(f"{what} holds token id {top:,} but the model has only {vocab_size:,} embedding rows; "
                          "use the model's own tokenizer (or data tokenized with it)")


def decoded_counts(tokenizer: Tokenizer, ids: np.ndarray, eos_id: int) -> tuple[int, int]:
    """UTF-8 bytes and whitespace words of the text behind ``ids`` (documents split at EOS, decoded).

    For a whole split the manifest's counts are exact; this measures a slice (``--max-tokens``).
    """
    cuts = np.flatnonzero(np.asarray(ids) == eos_id)
    n_bytes = n_words = 0
    for a, b in itertools.pairwise([-1, *cuts.tolist(), len(ids)]):
        if b - a > 1:
            text = tokenizer.decode([int(i) for i in ids[a + 1:b]])
            n_bytes, n_words = n_bytes + len(text.encode("utf-8")), n_words + len(text.split())
    return n_bytes, n_words


def source_hash(paths: list[Path]) -> str:
    """sha256 over the names and bytes of the source files."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "data"

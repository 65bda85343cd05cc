"""Corpora: documents (strings) read from local files or named public sources.

A source is a path (``.txt``, ``.jsonl``, ``.parquet``, or a folder of those) or a name
(`NAMED_SOURCES`). How a ``.txt`` file splits into documents (`DocSplit`):

* ``separator``: on a separator string (default ``<|endoftext|>``), e.g. TinyStories;
* ``blocks``: blank-line blocks (a speech of a play, a paragraph) grouped in file order into
  documents of at least ``min_document_chars`` characters, e.g. Tiny Shakespeare, which has no
  document markers: 10,000 characters give about 110 documents of ~40 consecutive speeches, so a
  held-out document is a contiguous stretch of a play;
* ``books``: the joined Gutenberg file, one document per book (each starts with a
  "Title by Author" line after three blank lines; see `split_books`);
* ``file``: the whole file is one document;
* ``auto``: a named source's own rule; for a path, ``separator`` when the separator occurs in the
  file, else ``blocks``.

Named sources come from ``LEGOLM_DATA`` when the shared folder holds them, else they are
downloaded once into ``<LEGOLM_CACHE>/sources`` (HTTP, or Hugging Face ``datasets`` for the
Wikitext and Pile samples).
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from legolm.data.sources import ENV_VAR, cache_root, download, shared_root
from legolm.data.tokenizer import EOS_TOKEN
from legolm.errors import ConfigError, LegolmError

DocSplit = Literal["auto", "separator", "blocks", "books", "file"]
SUFFIXES = (".txt", ".jsonl", ".parquet")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_TITLE = re.compile(r"^\[?(?P<title>\S.*?),? by (?P<author>[A-Z][^\]]*?)(?: \d{4})?\]?$")
TITLE_MAX_CHARS = 100  # a book's title line is short
TITLE_MIN_BLANK_LINES = 3  # blank lines before a book's title in the joined Gutenberg file
_GUTENBERG_REPO = "https://raw.githubusercontent.com/luolin19850304/StoryGenerator"
_GUTENBERG_FILES = {  # file -> commit holding it (the public books behind the shared joined file)
    **{f: "d5895e924bbc273d314fc32e0a8ef52a0cd3d1ef" for f in (
        "austen-emma", "austen-persuasion", "austen-sense", "carroll-alice", "chesterton-ball",
        "chesterton-thursday", "dickens-expectations", "dickens-hard-times", "dickens-twist", "grimm",
        "sawyer-twain", "shelley-frankenstein")},
    **{f: "1cfd56a7f1c8ebb063714bad61b1ce8cd23eb6a1" for f in (
        "austen-pride-and-prejudice", "bryant-stories", "burgess-busterbrown", "dickens-christmas-carol",
        "dickens-tale-of-two-cities", "doyle-holmes", "stevenson-hyde")},
    **{f: "b499cee181184a4717bc8f2fcb5d8022048da205" for f in (
        "dracula-stoker", "wilde-dorian", "yellow-wallpaper-gilman")},
}


@dataclass(frozen=True)
class NamedSource:
    """Where a named corpus lives.

    Attributes:
        shared: Path under ``LEGOLM_DATA`` (None: not in the shared folder).
        shared_split: How the shared file splits into documents.
        urls: Cache-relative path -> public URL, downloaded when the shared folder lacks it.
        hf_dataset: (hub name, config) loaded with ``datasets`` when there are no URLs.
        download_split: How the downloaded files split into documents.
    """

    shared: str | None = None
    shared_split: DocSplit = "auto"
    urls: dict[str, str] = field(default_factory=dict)
    hf_dataset: tuple[str, str | None] | None = None
    download_split: DocSplit = "auto"


NAMED_SOURCES: dict[str, NamedSource] = {
    "tinyshakespeare": NamedSource(
        "data/tinyshakespeare.txt", "blocks",
        {"sources/tinyshakespeare.txt":
         "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"},
        download_split="blocks"),
    "tinystories": NamedSource(
        "data/tinystories/tinystories_sample_2MB.txt", "separator",
        {"sources/tinystories_sample.txt":
         "https://raw.githubusercontent.com/gusjengis/toy-RNN/e4c7ff8bba4ff7989e69a3a816ebe4b14813b41e/"
         "data/tinystories_sample.txt"},
        download_split="separator"),
    "gutenberg": NamedSource(
        "data/gutenberg/gutenberg_26_novels.txt", "books",
        {f"sources/gutenberg/{name}.txt": f"{_GUTENBERG_REPO}/{commit}/data/{name}.txt"
         for name, commit in _GUTENBERG_FILES.items()},
        download_split="file"),
    "wikitext-2": NamedSource(hf_dataset=("Salesforce/wikitext", "wikitext-2-raw-v1")),
    "wikitext-103": NamedSource(hf_dataset=("Salesforce/wikitext", "wikitext-103-raw-v1")),
    "pile-sample": NamedSource(hf_dataset=("NeelNanda/pile-10k", None)),
}


@dataclass
class ResolvedSource:
    """Local files of a source and how their ``.txt`` files split into documents."""

    name: str
    paths: list[Path]
    doc_split: DocSplit


# -- resolving a source -------------------------------------------------------------------------------
def resolve_source(source: str) -> ResolvedSource:
    """Local files of a named source (shared folder, else download) or of a path.

    Raises:
        LegolmError: A path that does not exist, a folder without data files, or a named source
            that is neither shared nor downloadable (offline).
    """
    if source in NAMED_SOURCES:
        return _resolve_named(source, NAMED_SOURCES[source])
    path = Path(source).expanduser()
    if not path.exists():
        raise LegolmError(f"data source {source} is neither an existing file/folder nor a named source "
                          f"({', '.join(NAMED_SOURCES)})")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise ConfigError(f"{path}: unsupported data file type {path.suffix!r}; use {', '.join(SUFFIXES)}")
        return ResolvedSource(path.stem, [path], "auto")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise LegolmError(f"folder {path} holds no {', '.join(SUFFIXES)} files")
    return ResolvedSource(path.name, files, "auto")


def _resolve_named(name: str, spec: NamedSource) -> ResolvedSource:
    root = shared_root()
    if root is not None and spec.shared and (root / spec.shared).is_file():
        return ResolvedSource(name, [root / spec.shared], spec.shared_split)
    if spec.urls:
        paths = [download(url, cache_root() / rel) for rel, url in spec.urls.items()]
        return ResolvedSource(name, paths, spec.download_split)
    assert spec.hf_dataset is not None
    return ResolvedSource(name, [_fetch_hf_dataset(name, *spec.hf_dataset)], "auto")


def _fetch_hf_dataset(name: str, repo: str, config: str | None) -> Path:
    """Every split of a hub dataset as ``<cache>/sources/<name>.jsonl``, one document per line."""
    dest = cache_root() / "sources" / f"{name}.jsonl"
    if dest.is_file():
        return dest
    try:
        import datasets
    except ImportError:
        raise LegolmError(f"{name} is not in the shared folder and downloading it needs `datasets`: "
                          f"pip install 'legolm[data]', or set {ENV_VAR} to a folder that has it") from None
    try:
        loaded = datasets.load_dataset(repo, config)
    except Exception as err:  # offline, hub down: the user's to fix
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LegolmError(f"cannot download {repo} ({first}); offline, set {ENV_VAR} to the shared data folder"
                          ) from None
    docs: list[str] = []
    for split in loaded:  # train, validation, test in the hub's order
        texts = list(loaded[split]["text"])
        docs += wikitext_articles(texts) if repo.endswith("wikitext") else [t for t in texts if t.strip()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".jsonl.part")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    tmp.replace(dest)
    return dest


def wikitext_articles(lines: list[str]) -> list[str]:
    """Group Wikitext rows (one line each) into articles; an article starts at a `` = Title = `` row."""
    articles: list[list[str]] = []
    for line in lines:
        heading = line.strip()
        if heading.startswith("= ") and heading.endswith(" =") and not heading.startswith("= ="):
            articles.append([])
        if articles:
            articles[-1].append(line)
    return ["".join(a).strip() for a in articles if "".join(a).strip()]


# -- reading documents --------------------------------------------------------------------------------
def read_documents(source: ResolvedSource, *, text_field: str = "text", separator: str | None = None,
                   doc_split: DocSplit = "auto", min_document_chars: int = 10_000) -> Iterator[str]:
    """Yield the documents of every file of ``source`` in order (empty documents are skipped).

    Args:
        source: From `resolve_source`.
        text_field: Field of ``.jsonl`` records / column of ``.parquet`` files holding the text.
        separator: Document separator of ``.txt`` files (None: ``<|endoftext|>``).
        doc_split: How ``.txt`` files split (``auto``: the source's own rule).
        min_document_chars: Smallest document of the ``blocks`` rule.
    """
    mode = source.doc_split if doc_split == "auto" else doc_split
    for path in source.paths:
        if path.suffix == ".jsonl":
            yield from _jsonl(path, text_field)
        elif path.suffix == ".parquet":
            yield from _parquet(path, text_field)
        else:
            yield from split_text(_read_text(path), mode, separator or EOS_TOKEN, min_document_chars)


def split_text(text: str, mode: DocSplit, separator: str, min_document_chars: int) -> list[str]:
    """Documents of one ``.txt`` file under rule ``mode`` (see the module docstring)."""
    if mode == "auto":
        mode = "separator" if separator in text else "blocks"
    if mode == "separator":
        docs = text.split(separator)
    elif mode == "blocks":
        docs = group_blocks(text, min_document_chars)
    elif mode == "books":
        docs = split_books(text)
    else:
        docs = [text]
    return [d.strip() for d in docs if d.strip()]


def group_blocks(text: str, min_chars: int) -> list[str]:
    """Blank-line blocks joined (with a blank line) into consecutive documents of >= ``min_chars`` chars."""
    docs, current, size = [], [], 0
    for block in _BLANK_LINES.split(text):
        if not block.strip():
            continue
        current.append(block.strip("\n"))
        size += len(block)
        if size >= min_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def split_books(text: str) -> list[str]:
    """Split the joined Gutenberg file into books.

    A book starts at the file's first line, or at a title: a short line between >= 3 blank lines
    and one blank line that reads "Title by Author" (optionally ", by", a year, brackets). One
    book of the shared file has a title without "by" ("THE ADVENTURES OLIVER TWIST CHARLES
    DICKENS"): an upper-case line placed like a title that ends with an author named by another
    title line is a title too.
    """
    lines = text.split("\n")
    candidates = [i for i in range(1, len(lines)) if _after_blank_lines(lines, i)]
    authors = tuple({m["author"].upper() for i in candidates if (m := _TITLE.match(lines[i].strip()))})
    starts = [i for i in candidates if _TITLE.match(lines[i].strip())
              or (authors and lines[i].isupper() and lines[i].strip().endswith(authors))]
    return ["\n".join(lines[a:b]) for a, b in itertools.pairwise([0, *starts, len(lines)])]


def _after_blank_lines(lines: list[str], i: int) -> bool:
    line = lines[i].strip()
    if not line or len(line) > TITLE_MAX_CHARS:
        return False
    before = lines[max(0, i - TITLE_MIN_BLANK_LINES):i]
    alone = i + 1 == len(lines) or not lines[i + 1].strip()  # a title is followed by a blank line
    return alone and len(before) == TITLE_MIN_BLANK_LINES and not any(b.strip() for b in before)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LegolmError(f"{path} is not UTF-8 text ({err})") from None


def _jsonl(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise LegolmError(f"{path}:{n} is not valid JSON ({err})") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ConfigError(f"{path}:{n} has no field {text_field!r} (has {keys}); pass --text-field")
            if str(record[text_field]).strip():
                yield str(record[text_field])


def _parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LegolmError(f"reading {path} needs pyarrow: pip install 'legolm[data]'") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own error types for broken files
        raise LegolmError(f"{path} is not a readable parquet file ({err})") from None
    if text_field not in table.column_names:
        raise ConfigError(f"{path} has no column {text_field!r} (has {table.column_names}); pass --text-field")
    yield from (t for t in table.column(text_field).to_pylist() if t and str(t).strip())

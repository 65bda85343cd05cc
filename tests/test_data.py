"""Real-data pipeline: documents from the shared corpora, tokenizer specs, tokenized memmaps split by document."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import legolm
from legolm.core.config import ModelConfig
from legolm.data import (
    DataConfig,
    Tokenizer,
    check_fits,
    load_tokenized,
    prepare_corpus,
    read_documents,
    resolve_source,
    resolve_tokenizer,
    split_documents,
)
from legolm.data import tokenized as tokenized_mod
from legolm.data.corpus import ResolvedSource, group_blocks, split_books, wikitext_articles
from legolm.data.tokenized import decoded_counts
from legolm.errors import ConfigError, LegolmError

EOS = "<|endoftext|>"


@pytest.fixture(scope="module", autouse=True)
def _env(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Named sources from the shared folder; downloads and tokenized data in a temp cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEGOLM_DATA", str(shared_dir))
        mp.setenv("LEGOLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("tokenized"))


@pytest.fixture(scope="module")
def gpt2_tok() -> Tokenizer:
    return resolve_tokenizer("gpt2")


@pytest.fixture(scope="module")
def shakespeare_gpt2(cache: str) -> legolm.data.TokenizedCorpus:
    return prepare_corpus(DataConfig(source="tinyshakespeare", tokenizer="gpt2", cache_dir=cache), progress=False)


def _write_small_txt(path: Path, text: str, n_chars: int) -> Path:
    path.write_text(text[:n_chars], encoding="utf-8")
    return path


# -- documents ---------------------------------------------------------------------------------------
def test_group_blocks_hand_checked() -> None:
    text = "A:\nhi\n\nB:\nyo\n\n\nC:\nlong line here\n\nD:\nx\n"
    # blocks: "A:\nhi" (5), "B:\nyo" (5), "C:\nlong line here" (16), "D:\nx\n" (5) -> >= 10 chars each
    assert group_blocks(text, 10) == ["A:\nhi\n\nB:\nyo", "C:\nlong line here", "D:\nx"]


def test_tinyshakespeare_documents_are_contiguous_speech_groups(shakespeare_text: str) -> None:
    src = resolve_source("tinyshakespeare")
    assert src.doc_split == "blocks"
    docs = list(read_documents(src))
    assert docs[0].startswith("First Citizen:\nBefore we proceed any further, hear me speak.")
    assert all(len(d) >= 10_000 for d in docs[:-1])
    assert 100 <= len(docs) <= 115
    # Nothing lost or reordered: the documents are consecutive runs of the file's speeches.
    blocks = [b.strip("\n") for b in shakespeare_text.split("\n\n") if b.strip()]
    assert "\n\n".join(docs) == "\n\n".join(blocks)


def test_gutenberg_splits_into_books(shared_dir: Path) -> None:
    text = (shared_dir / "data/gutenberg/gutenberg_26_novels.txt").read_text(encoding="utf-8")
    books = split_books(text)
    assert "\n".join(books) == text  # a partition of the file's lines
    titles = [b.split("\n", 1)[0] for b in books]
    assert len(books) == 25
    for title in ("Emma by Jane Austen 1816", "Moby Dick by Herman Melville 1851", "Dracula, by Bram Stoker",
                  "THE ADVENTURES OLIVER TWIST CHARLES DICKENS", "The Yellow Wallpaper, by Charlotte Perkins Gilman"):
        assert title in titles
    dracula = books[titles.index("Dracula, by Bram Stoker")]
    assert "Boarded by Turkish Customs" in dracula  # a diary line that reads like "X by Y" stays inside its book
    assert len(list(read_documents(resolve_source("gutenberg")))) == 25


def test_tinystories_splits_on_endoftext(shared_dir: Path) -> None:
    text = (shared_dir / "data/tinystories/tinystories_sample_2MB.txt").read_text(encoding="utf-8")
    docs = list(read_documents(resolve_source("tinystories")))
    assert len(docs) == text.count(EOS) + 1
    assert not any(EOS in d for d in docs)
    assert docs[0] == text.split(EOS)[0].strip()


def test_jsonl_parquet_and_folder(tmp_path: Path, shakespeare_text: str) -> None:
    import pyarrow as pa  # in the test extra; users get it with `legolm[data]`
    import pyarrow.parquet as pq

    docs = group_blocks(shakespeare_text[:6000], 1000)
    folder = tmp_path / "mixed"
    folder.mkdir()
    with open(folder / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(docs[:3]))
    pq.write_table(pa.table({"content": docs[3:]}), folder / "b.parquet")
    (folder / "notes.md").write_text("ignored")
    assert list(read_documents(resolve_source(str(folder / "a.jsonl")), text_field="content")) == docs[:3]
    assert list(read_documents(resolve_source(str(folder / "b.parquet")), text_field="content")) == docs[3:]
    assert list(read_documents(resolve_source(str(folder)), text_field="content")) == docs
    with pytest.raises(ConfigError, match=r"no field 'text'.*--text-field"):
        list(read_documents(resolve_source(str(folder / "a.jsonl"))))
    with pytest.raises(ConfigError, match="no column 'text'"):
        list(read_documents(resolve_source(str(folder / "b.parquet"))))


def test_wikitext_rows_group_into_articles() -> None:
    rows = [" = Valkyria = \n", " Senjō no Valkyria .\n", " = = Gameplay = = \n", " Turn based .\n",
            " = Tower Building = \n", " The Tower .\n"]
    assert wikitext_articles(rows) == ["= Valkyria = \n Senjō no Valkyria .\n = = Gameplay = = \n Turn based .",
                                       "= Tower Building = \n The Tower ."]


def test_named_source_offline_without_shared_folder_names_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    monkeypatch.delenv("LEGOLM_DATA")
    monkeypatch.setenv("LEGOLM_CACHE", str(tmp_path))

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(LegolmError, match="LEGOLM_DATA") as err:
        resolve_source("tinyshakespeare")
    assert "\n" not in str(err.value)
    assert not list(tmp_path.rglob("*.part*"))  # no half-written download left behind


# -- tokenizers --------------------------------------------------------------------------------------
def test_fingerprint_is_stable_and_tells_tokenizers_apart(gpt2_tok: Tokenizer, gpt2_tokenizer_dir: Path,
                                                          tmp_path: Path) -> None:
    again = Tokenizer.from_dir(gpt2_tokenizer_dir)
    assert again.fingerprint() == gpt2_tok.fingerprint()
    gpt2_tok.save(tmp_path)  # tokenizer.json form of the same vocabulary + merges
    assert Tokenizer.from_dir(tmp_path).fingerprint() == gpt2_tok.fingerprint()
    assert resolve_tokenizer("pythia").fingerprint() != gpt2_tok.fingerprint()
    again.bos_id = 50256  # a BOS that is never prepended changes no ids (HF config.json adds one)
    assert again.fingerprint() == gpt2_tok.fingerprint()
    again.eos_id = 0
    assert again.fingerprint() != gpt2_tok.fingerprint()  # the EOS that ends every document is part of it


def test_resolve_tokenizer_gguf_and_directory(smollm2_gguf: Path, gpt2_tokenizer_dir: Path,
                                              gpt2_tok: Tokenizer, shakespeare_text: str) -> None:
    tok = resolve_tokenizer(str(smollm2_gguf))  # the vocabulary inside the GGUF file
    assert tok.vocab_size == 49152 and tok.backend.id_to_token(tok.eos_id) == "<|im_end|>"
    assert tok.decode(tok.encode(shakespeare_text[:2000])) == shakespeare_text[:2000]
    assert resolve_tokenizer(str(gpt2_tokenizer_dir)).fingerprint() == gpt2_tok.fingerprint()


@pytest.mark.parametrize("spec, fragment", [
    ("no-such-tokenizer/../x", "bpe:<vocab_size>"),
    ("bpe:lots", "integer size"),
    ("bpe:100", "at least 257"),
])
def test_bad_tokenizer_specs(monkeypatch: pytest.MonkeyPatch, spec: str, fragment: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=fragment.replace("<", ".").replace(">", ".")):
        resolve_tokenizer(spec, corpus_texts=["some text"])


def test_trained_bpe_is_deterministic_and_stored_with_the_data(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(source="tinyshakespeare", tokenizer="bpe:400", max_documents=12, cache_dir=str(tmp_path / "a"))
    a = prepare_corpus(cfg, progress=False)
    b = prepare_corpus(DataConfig(**{**cfg.__dict__, "cache_dir": str(tmp_path / "b")}), progress=False)
    assert a.vocab_size == 400 and a.tokenizer.backend.id_to_token(a.eos_id) == EOS
    assert a.tokenizer.fingerprint() == b.tokenizer.fingerprint() == a.manifest["tokenizer_fingerprint"]
    np.testing.assert_array_equal(a.train, b.train)
    assert (a.directory / "tokenizer" / "tokenizer.json").is_file()

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the stored tokenizer should be reused, not trained again")

    monkeypatch.setattr("legolm.data.tokenizer.train_bpe", no_training)
    c = prepare_corpus(cfg, progress=False)
    assert c.tokenizer.fingerprint() == a.tokenizer.fingerprint()
    np.testing.assert_array_equal(c.val, a.val)


# -- tokenized storage -------------------------------------------------------------------------------
def test_streams_are_documents_joined_by_eos_never_padded(shakespeare_gpt2: legolm.data.TokenizedCorpus,
                                                          gpt2_tok: Tokenizer) -> None:
    c = shakespeare_gpt2
    assert isinstance(c.train, np.memmap) and c.train.dtype == np.uint16 and c.val.dtype == np.uint16
    assert c.eos_id == 50256 and c.vocab_size == 50257
    docs = list(read_documents(resolve_source("tinyshakespeare")))
    train_docs, val_docs = split_documents(docs, 0.1, 0)
    for arr, split_docs, name in ((c.train, train_docs, "train"), (c.val, val_docs, "val")):
        expected = np.concatenate([np.array([*gpt2_tok.encode(d), c.eos_id]) for d in split_docs])
        np.testing.assert_array_equal(np.asarray(arr), expected)
        eos_at = np.flatnonzero(np.asarray(arr) == c.eos_id)
        assert len(eos_at) == len(split_docs) == c.manifest["counts"][name]["documents"]
        assert np.all(np.diff(eos_at) > 1)  # no run of EOS: nothing is padded
        counts = c.manifest["counts"][name]
        assert counts["tokens"] == len(arr)
        assert counts["bytes"] == sum(len(d.encode()) for d in split_docs)
        assert counts["words"] == sum(len(d.split()) for d in split_docs)
        # Eval measures a slice by decoding it; over the whole split that gives the manifest's numbers.
        assert decoded_counts(c.tokenizer, np.asarray(arr), c.eos_id) == (counts["bytes"], counts["words"])
    assert c.manifest["tokenizer_fingerprint"] == gpt2_tok.fingerprint()


def test_split_is_deterministic_and_disjoint_by_document() -> None:
    docs = list(read_documents(resolve_source("tinyshakespeare")))
    train, val = split_documents(docs, 0.1, seed=0)
    assert split_documents(docs, 0.1, seed=0) == (train, val)
    assert len(val) == round(len(docs) * 0.1)
    assert not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert [d for d in docs if d in set(val)] == val  # source order kept
    assert split_documents(docs, 0.1, seed=1)[1] != val


def test_rerun_loads_the_stored_arrays(shakespeare_gpt2: legolm.data.TokenizedCorpus, cache: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def no_tokenizing(*args: object, **kwargs: object) -> None:
        raise AssertionError("a re-run must load the stored arrays, not tokenize again")

    monkeypatch.setattr(tokenized_mod, "encode_documents", no_tokenizing)
    again = prepare_corpus(DataConfig(source="tinyshakespeare", tokenizer="gpt2", cache_dir=cache), progress=False)
    assert again.directory == shakespeare_gpt2.directory
    np.testing.assert_array_equal(again.val, shakespeare_gpt2.val)
    # Other split settings are other data.
    with pytest.raises(AssertionError, match="tokenize again"):
        prepare_corpus(DataConfig(source="tinyshakespeare", tokenizer="gpt2", cache_dir=cache, split_seed=1),
                       progress=False)


def test_data_made_with_another_tokenizer_is_refused(shakespeare_gpt2: legolm.data.TokenizedCorpus) -> None:
    assert shakespeare_gpt2.directory is not None
    with pytest.raises(ConfigError, match="fingerprint") as err:
        load_tokenized(shakespeare_gpt2.directory, resolve_tokenizer("pythia"))
    assert "\n" not in str(err.value)
    assert load_tokenized(shakespeare_gpt2.directory).tokenizer.fingerprint() == shakespeare_gpt2.manifest[
        "tokenizer_fingerprint"]


def test_corpus_errors(tmp_path: Path, shakespeare_text: str, cache: str) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(LegolmError, match="empty corpus"):
        prepare_corpus(DataConfig(source=str(empty), cache_dir=cache), progress=False)
    one_doc = _write_small_txt(tmp_path / "one.txt", shakespeare_text, 3000)
    with pytest.raises(ConfigError, match="no validation documents"):
        prepare_corpus(DataConfig(source=str(one_doc), cache_dir=cache), progress=False)
    with pytest.raises(LegolmError, match="neither an existing file"):
        prepare_corpus(DataConfig(source=str(tmp_path / "missing.txt"), cache_dir=cache), progress=False)
    with pytest.raises(ConfigError, match="val_fraction"):
        prepare_corpus(DataConfig(val_fraction=0.0, cache_dir=cache), progress=False)
    with pytest.raises(ConfigError, match="unknown tokenizer"):
        prepare_corpus(DataConfig(tokenizer=str(tmp_path), cache_dir=cache), progress=False)


def test_check_fits(shakespeare_gpt2: legolm.data.TokenizedCorpus, tmp_path: Path, shakespeare_text: str,
                    cache: str) -> None:
    gpt2 = ModelConfig.from_name("tiny-gpt2", vocab_size=50257)  # block_size 128
    check_fits(shakespeare_gpt2, gpt2, 128)
    with pytest.raises(ConfigError, match="embedding has 512 rows"):
        check_fits(shakespeare_gpt2, ModelConfig.from_name("tiny-gpt2"), 64)
    with pytest.raises(ConfigError, match="block_size 128"):
        check_fits(shakespeare_gpt2, gpt2, 129)
    small = _write_small_txt(tmp_path / "small.txt", shakespeare_text, 2000)  # 10 documents of >= 100 chars
    tiny = prepare_corpus(DataConfig(source=str(small), min_document_chars=100, cache_dir=cache), progress=False)
    window = len(tiny.val)  # one window + 1 token does not fit in val
    assert window <= 128 < len(tiny.train)
    check_fits(tiny, gpt2, window - 1)
    with pytest.raises(ConfigError, match="val split has"):
        check_fits(tiny, gpt2, window)


def test_resolved_source_of_explicit_separator(tmp_path: Path, shakespeare_text: str) -> None:
    blocks = [b.strip() for b in group_blocks(shakespeare_text[:3000], 500)]  # documents are stripped
    path = tmp_path / "sep.txt"
    path.write_text("\n###\n".join(blocks))
    src = ResolvedSource("sep", [path], "auto")
    assert list(read_documents(src, separator="###")) == blocks
    assert list(read_documents(src, doc_split="file")) == ["\n###\n".join(blocks)]

"""Text data: tokenizers, corpora (documents from files or named sources), tokenized memmaps."""

from legolm.data.corpus import NAMED_SOURCES, read_documents, resolve_source
from legolm.data.tokenized import (
    DataConfig,
    TokenizedCorpus,
    check_fits,
    load_tokenized,
    prepare_corpus,
    split_documents,
)
from legolm.data.tokenizer import Tokenizer, resolve_tokenizer, train_bpe

__all__ = [
    "NAMED_SOURCES",
    "DataConfig",
    "TokenizedCorpus",
    "Tokenizer",
    "check_fits",
    "load_tokenized",
    "prepare_corpus",
    "read_documents",
    "resolve_source",
    "resolve_tokenizer",
    "split_documents",
    "train_bpe",
]

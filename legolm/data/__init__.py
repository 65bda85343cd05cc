"""Text data: tokenizers (and, later, corpora and batching)."""

"""The ``legolm eval ppl`` job: sliding-window perplexity of a model on held-out real text.

The text is a named source or a file/folder (tokenized once with the model's own tokenizer and split
by document exactly as training splits it), or a folder of tokenized data that
`legolm.data.prepare_corpus` wrote (refused if another tokenizer made it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch

from legolm.checkpoints.loader import load, load_pretrained
from legolm.data.tokenized import (
    MANIFEST,
    DataConfig,
    TokenizedCorpus,
    check_ids,
    decoded_counts,
    load_tokenized,
    prepare_corpus,
)
from legolm.data.tokenizer import MODEL_TOKENIZER, Tokenizer, resolve_tokenizer
from legolm.errors import ConfigError, LegolmError, TokenizerError
from legolm.eval.perplexity import PPLResult, check_windows, sliding_window_ppl
from legolm.eval.sanity import PPLBands
from legolm.model.transformer import TransformerLM
from legolm.utils.device import DtypeName, device_and_dtype
from legolm.utils.io import atomic_write_text, check_writable, finite_json


@dataclass
class PPLConfig:
    """``legolm eval ppl``: the model, the text, the windows and the slice of the text scored.

    Attributes:
        model: The model: a legolm/Hugging Face directory, .gguf file, or hub name.
        data: The text (data.source: a named source, a file/folder, or a tokenized-data folder) and its tokenizer
            (data.tokenizer: model = the model's own, the one it was trained with).
        max_length: Window length in tokens (at most the model's block_size).
        stride: Tokens each window moves on; max_length = disjoint windows, smaller = more context per token.
        batch_size: Windows per forward pass.
        split: Documents scored: auto (all of a file/folder you give, val of a named source), val, train or all.
        max_tokens: Score only the first N tokens of the split (None: all).
        ppl_bands: Bands of the sanity check printed under the perplexity.
        json: Also write the result as JSON to this path.
        overwrite: Replace an existing json file.
        device: cpu, cuda, cuda:N or auto (CUDA when visible).
        dtype: Weights dtype (auto: bf16 on a GPU, fp32 on the CPU).
    """

    model: str = ""
    data: DataConfig = field(default_factory=lambda: DataConfig(source="", tokenizer=MODEL_TOKENIZER))
    max_length: int = 1024
    stride: int = 512
    batch_size: int = 8
    split: Literal["auto", "val", "train", "all"] = "auto"
    max_tokens: int | None = None
    ppl_bands: PPLBands = field(default_factory=PPLBands)
    json: str | None = None
    overwrite: bool = False
    device: str = "auto"
    dtype: DtypeName = "auto"

    def validate(self) -> None:
        """Raise `LegolmError` naming the first missing or bad setting (the data's own settings: `DataConfig`)."""
        if not self.model:
            raise ConfigError("give --model (a legolm/Hugging Face directory, .gguf file or hub name)")
        if not self.data.source:
            raise ConfigError("give --data (a named source such as tinyshakespeare, a file/folder, or a "
                              "tokenized-data folder)")
        self.ppl_bands.validate("ppl_bands: ")
        if self.json:
            check_writable(self.json, "--json", kind="file")
        if self.json and Path(self.json).exists() and not self.overwrite:
            raise LegolmError(f"{self.json} already exists; choose another --json path or pass --overwrite")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise LegolmError(f"--max-tokens must be >= 2, got {self.max_tokens}")


def run(cfg: PPLConfig) -> dict[str, Any]:
    """Score ``cfg.model`` on ``cfg.data``'s text: print the table and the sanity verdict, write ``cfg.json``."""
    cfg.validate()
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    own_tokenizer = cfg.data.tokenizer == MODEL_TOKENIZER
    model, tokenizer = _model_and_tokenizer(cfg.model, device, dtype, own_tokenizer)
    check_windows(model.config.block_size, cfg.max_length, cfg.stride, cfg.batch_size)  # before any tokenizing
    data_cfg = dataclasses.replace(cfg.data, tokenizer=cfg.model) if own_tokenizer else cfg.data
    data_cfg.validate()
    split = resolve_split(cfg.split, data_cfg.source)
    corpus = _corpus(data_cfg, tokenizer or resolve_tokenizer(data_cfg.tokenizer), hold_out=split != "all")
    ids = corpus.split(split)
    ids = ids[: cfg.max_tokens] if cfg.max_tokens else ids
    check_ids(ids, model.config.vocab_size, f"the {split} text")
    n_bytes, n_words = _text_counts(corpus, split, cfg.max_tokens, ids)
    result = sliding_window_ppl(model, ids, cfg.max_length, cfg.stride, cfg.batch_size, device, n_bytes=n_bytes,
                                n_words=n_words)
    _print_table(split, result)
    verdict = cfg.ppl_bands.check(split, result.ppl, model.config.vocab_size)
    print(verdict.message)
    payload = {"model": cfg.model, "data": data_cfg.source, "data_dir": str(corpus.directory), "split": split,
               "tokenizer": corpus.manifest["tokenizer"], **result.to_dict(), "ppl_check": verdict.to_dict()}
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg.json, finite_json(payload, str(cfg.json), indent=2))
        print(f"wrote {cfg.json}")
    return payload


def resolve_split(split: str, source: str) -> Literal["val", "train", "all"]:
    """``auto``: all of a text file/folder the user gives (it is the evaluation text), else the val split."""
    if split in ("val", "train", "all"):
        return cast(Literal["val", "train", "all"], split)
    path = Path(source).expanduser()
    return "all" if path.exists() and not (path / MANIFEST).is_file() else "val"


def _model_and_tokenizer(model_spec: str, device: str, dtype: torch.dtype,
                         own_tokenizer: bool) -> tuple[TransformerLM, Tokenizer | None]:
    """The model, and its own tokenizer when that is the one wanted (read with it: the checkpoint once)."""
    if not own_tokenizer:
        return load_pretrained(model_spec, device=device, dtype=dtype), None
    try:
        return load(model_spec, device=device, dtype=dtype)
    except TokenizerError as err:
        raise ConfigError(f"--model {model_spec} brings no tokenizer ({err}); pass --tokenizer (e.g. gpt2)") from None


def _corpus(data_cfg: DataConfig, tokenizer: Tokenizer, hold_out: bool = True) -> TokenizedCorpus:
    """Stored tokenized data (checked against ``tokenizer``), or the source tokenized with it now.

    Args:
        data_cfg: The data settings.
        tokenizer: The tokenizer to use.
        hold_out: Split the documents into train/val (False: all of them in one stream).
    """
    if (Path(data_cfg.source).expanduser() / MANIFEST).is_file():
        return load_tokenized(Path(data_cfg.source).expanduser(), tokenizer)
    return prepare_corpus(data_cfg, tokenizer=tokenizer, hold_out=hold_out)


def _text_counts(corpus: TokenizedCorpus, split: str, max_tokens: int | None, ids: Any) -> tuple[int, int]:
    """Bytes and words of the scored text: the manifest's for a whole split, else decoded."""
    if max_tokens is None or max_tokens >= len(corpus.split(split)):
        counts = corpus.counts(split)
        return counts["bytes"], counts["words"]
    return decoded_counts(corpus.tokenizer, ids, corpus.eos_id)


def _print_table(split: str, r: PPLResult) -> None:
    row: dict[str, Any] = {
        "split": split, "tokens scored": f"{r.n_tokens:,}", "max_length": r.max_length, "stride": r.stride,
        "nll/token": f"{r.nll:.4f}", "ppl": f"{r.ppl:.3f}", "bits/byte": f"{r.bits_per_byte:.4f}",
        "word ppl": f"{r.word_ppl:.2f}",
    }
    widths = {k: max(len(k), len(str(v))) for k, v in row.items()}
    print("| " + " | ".join(k.ljust(widths[k]) for k in row) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths.values()) + "|")
    print("| " + " | ".join(str(v).ljust(widths[k]) for k, v in row.items()) + " |")



"""`Tokenizer`: a thin wrapper over Hugging Face `tokenizers` with legolm's loading rules.

Loads a ``tokenizer.json``, GPT-2 style ``vocab.json`` + ``merges.txt``, or the BPE vocabulary
stored inside a GGUF file; remembers BOS/EOS ids and whether BOS is prepended.
`resolve_tokenizer` turns a spec string (``gpt2``, ``pythia``, ``bpe:8192``, a path, a hub name)
into one, training a byte-level BPE on the corpus for ``bpe:<vocab_size>``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from legolm.errors import ConfigError, LegolmError, TokenizerError
from legolm.utils.gguf_file import gguf_reader, read_fields
from legolm.utils.hub import resolve
from legolm.utils.io import read_json

EOS_TOKEN = "<|endoftext|>"
SHARED_TOKENIZERS = ("gpt2", "pythia")  # names found under <LEGOLM_DATA>/tokenizers/
BPE_PREFIX = "bpe:"
MODEL_TOKENIZER = "model"  # a data.tokenizer value of finetune and eval ppl: the model's own tokenizer
GGUF_CHAT_TEMPLATE = "tokenizer.chat_template"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
DEFAULT_TEMPLATE_NAME = "default"  # the template picked from a list of named ones
# The parts of a tokenizer.json that decide which ids a text becomes (decoder/padding do not).
_FINGERPRINT_KEYS = ("normalizer", "pre_tokenizer", "model", "added_tokens")


class Tokenizer:
    """Text <-> token ids.

    Args:
        backend: The `tokenizers.Tokenizer` doing the work.
        bos_id: Beginning-of-sequence id, or None.
        eos_id: End-of-sequence id, or None.
        add_bos: Prepend ``bos_id`` in `encode`.
        chat_template: The Jinja chat template stored with the tokenizer (GGUF ``tokenizer.chat_template``,
            a directory's ``chat_template.jinja`` or ``tokenizer_config.json``), or None.
    """

    def __init__(self, backend: HFTokenizer, bos_id: int | None = None, eos_id: int | None = None,
                 add_bos: bool = False, chat_template: str | None = None) -> None:
        self.backend, self.bos_id, self.eos_id, self.add_bos = backend, bos_id, eos_id, add_bos
        self.chat_template = chat_template
        self._fingerprint: tuple[tuple[int | None, int | None, bool], str] | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos and self.bos_id is not None else ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` many texts at once (in parallel in the Rust backend)."""
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        prefix = [self.bos_id] if self.add_bos and self.bos_id is not None else []
        return [prefix + e.ids for e in encodings]

    def fingerprint(self) -> str:
        """A stable hash (hex sha256) of the vocabulary, merges, pre-tokenizer and special ids.

        Two tokenizers with the same fingerprint turn every text into the same ids and end documents
        with the same EOS id (BOS counts only when it is prepended); it is stored
        in the manifests of tokenized data so data made with another tokenizer is refused. It is
        computed once per tokenizer (the backend is treated as immutable; the special ids are not).
        """
        special = (self.bos_id if self.add_bos else None, self.eos_id, self.add_bos)
        if self._fingerprint is None or self._fingerprint[0] != special:
            self._fingerprint = (special, self._compute_fingerprint(special))
        return self._fingerprint[1]

    def _compute_fingerprint(self, special: tuple[int | None, int | None, bool]) -> str:
        full = json.loads(self.backend.to_str())
        parts = {k: full.get(k) for k in _FINGERPRINT_KEYS}
        merges = parts["model"].get("merges") if isinstance(parts["model"], dict) else None
        if merges is not None:  # "a b" and ["a", "b"] are the same merge across tokenizers versions
            parts["model"] = {**parts["model"], "merges": [m if isinstance(m, str) else " ".join(m) for m in merges]}
        bos, eos, add_bos = special
        parts["special"] = {"bos_id": bos, "eos_id": eos, "add_bos": add_bos}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(ids, skip_special_tokens=skip_special_tokens))

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json``, ``legolm_tokenizer.json`` (special ids) and the chat template, if any
        (``chat_template.jinja``), into a directory."""
        directory = Path(directory)
        self.backend.save(str(directory / "tokenizer.json"))
        meta = {"bos_id": self.bos_id, "eos_id": self.eos_id, "add_bos": self.add_bos}
        (directory / "legolm_tokenizer.json").write_text(json.dumps(meta) + "\n")
        if self.chat_template is not None:
            (directory / CHAT_TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Load from a model or tokenizer directory (tokenizer.json, or vocab.json + merges.txt)."""
        d = Path(directory)
        if (d / "tokenizer.json").is_file():
            backend = _backend(d / "tokenizer.json", lambda: HFTokenizer.from_file(str(d / "tokenizer.json")))
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            bpe = _backend(d / "vocab.json", lambda: models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
            backend = HFTokenizer(bpe)
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
        else:
            raise TokenizerError(f"no tokenizer in {d}: expected tokenizer.json or vocab.json + merges.txt")
        return cls(backend, **_special_ids(d, backend), chat_template=_dir_chat_template(d))

    @classmethod
    def from_gguf_fields(cls, fields: dict[str, Any]) -> Tokenizer:
        """Rebuild the byte-level BPE tokenizer that a GGUF file stores (``tokenizer.ggml.*``)."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')")
        tokens: list[str] = fields["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        backend = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        # SmolLM's pre-tokenizer splits digits one by one before the GPT-2 regex.
        backend.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
            if fields.get("tokenizer.ggml.pre") == "smollm" else byte_level
        )
        backend.decoder = decoders.ByteLevel()
        types = fields.get("tokenizer.ggml.token_type", [])
        special = [tokens[i] for i, t in enumerate(types) if t == 3]  # 3 = CONTROL
        backend.add_special_tokens(special)
        template = fields.get(GGUF_CHAT_TEMPLATE)
        return cls(backend, fields.get("tokenizer.ggml.bos_token_id"), fields.get("tokenizer.ggml.eos_token_id"),
                   bool(fields.get("tokenizer.ggml.add_bos_token", False)),
                   str(template) if template is not None else None)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) of ``vocab_size`` tokens on ``texts``; deterministic.

    The vocabulary holds the 256 byte symbols, ``<|endoftext|>`` (the EOS id) and learned merges
    (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword Units"; the
    byte-level variant of Radford et al. 2019, GPT-2).
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ConfigError(f"bpe:{vocab_size} is too small: a byte-level BPE needs at least {len(alphabet) + 1} tokens")
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=alphabet,
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer)
    return Tokenizer(backend, bos_id=None, eos_id=backend.token_to_id(EOS_TOKEN))


def parse_bpe_spec(spec: str) -> int | None:
    """The vocabulary size of a ``bpe:<vocab_size>`` spec, None for other specs."""
    if not spec.startswith(BPE_PREFIX):
        return None
    size = spec[len(BPE_PREFIX):]
    if not size.isdigit():
        raise ConfigError(f"tokenizer spec {spec!r}: expected bpe:<vocab_size> with an integer size, e.g. bpe:8192")
    return int(size)


def resolve_tokenizer(spec: str, corpus_texts: Iterable[str] | None = None) -> Tokenizer:
    """The tokenizer a spec names.

    Args:
        spec: ``gpt2`` / ``pythia`` (shared copies, see `legolm.data.sources`), a tokenizer or model
            directory, a ``.gguf`` file, ``bpe:<vocab_size>`` (trained on ``corpus_texts``), or a
            Hugging Face hub name (needs network and ``legolm[hf]``).
        corpus_texts: Documents to train on, for ``bpe:`` specs only.

    Raises:
        ConfigError: An unknown spec (the message lists what is accepted).
    """
    from legolm.data.sources import shared_path

    vocab_size = parse_bpe_spec(spec)
    if vocab_size is not None:
        if corpus_texts is None:
            raise ConfigError(f"tokenizer {spec} is trained on the corpus: pass corpus_texts (prepare_corpus does)")
        return train_bpe(corpus_texts, vocab_size)
    if spec in SHARED_TOKENIZERS:
        return Tokenizer.from_dir(shared_path(f"tokenizers/{spec}"))
    try:
        return load_tokenizer(spec)
    except LegolmError as err:
        raise ConfigError(
            f"unknown tokenizer {spec!r} ({err}); expected one of {', '.join(SHARED_TOKENIZERS)}, "
            f"{BPE_PREFIX}<vocab_size>, a tokenizer/model directory, a .gguf file or a Hugging Face hub name"
        ) from None


def load_tokenizer(path_or_name: str | Path) -> Tokenizer:
    """The tokenizer that comes with a checkpoint (directory files or the GGUF's vocabulary).

    For the model as well use `legolm.load`, which reads the checkpoint once for both.
    """
    return checkpoint_tokenizer(resolve(path_or_name))


def checkpoint_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer stored at a resolved checkpoint path (a model directory, a .gguf file or a tokenizer.json).

    Raises:
        TokenizerError: None there, or one that cannot be read.
    """
    if path.is_file() and path.suffix == ".gguf":
        return Tokenizer.from_gguf_fields(read_fields(gguf_reader(path)))
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if path.is_file() and path.suffix == ".json":
        return Tokenizer.from_dir(path.parent)
    raise TokenizerError(f"no tokenizer found for {path}")


def _backend(path: Path, load: Callable[[], Any]) -> Any:
    """``load()`` (a `tokenizers` reader of ``path``), its errors as one `TokenizerError` line."""
    try:
        return load()
    except Exception as err:  # the Rust backend raises plain Exceptions
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TokenizerError(f"{path} is not a valid tokenizer file ({first})") from None


def _dir_chat_template(d: Path) -> str | None:
    """A directory's chat template: ``chat_template.jinja``, else the ``chat_template`` of
    ``tokenizer_config.json`` (a string, or a list of named templates: "default" is taken), else None."""
    if (d / CHAT_TEMPLATE_FILE).is_file():
        return (d / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    if not (d / "tokenizer_config.json").is_file():
        return None
    try:
        template = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get(DEFAULT_TEMPLATE_NAME)
    return template if isinstance(template, str) else None


def _special_ids(d: Path, backend: HFTokenizer) -> dict[str, Any]:
    """BOS/EOS ids from legolm's own metadata or from Hugging Face's tokenizer/generation configs."""
    try:
        if (d / "legolm_tokenizer.json").is_file():
            meta = read_json(d / "legolm_tokenizer.json")
            ids = {"bos_id": meta.get("bos_id"), "eos_id": meta.get("eos_id"), "add_bos": meta.get("add_bos", False)}
        else:
            ids = _hf_special_ids(d)
    except LegolmError as err:
        raise TokenizerError(str(err)) from None
    if ids["eos_id"] is None:
        ids["eos_id"] = backend.token_to_id("<|endoftext|>")
    vocab = backend.get_vocab_size(with_added_tokens=True)
    for key in ("bos_id", "eos_id"):
        value = ids[key]
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab):
            raise TokenizerError(f"tokenizer in {d}: {key} {value!r} is not an id of its {vocab}-token vocabulary")
    if not isinstance(ids["add_bos"], bool):
        raise TokenizerError(f"tokenizer in {d}: add_bos must be true or false, got {ids['add_bos']!r}")
    return ids


def _hf_special_ids(d: Path) -> dict[str, Any]:
    """BOS/EOS ids of Hugging Face's config.json / generation_config.json (the first of a list)."""
    ids: dict[str, Any] = {"bos_id": None, "eos_id": None, "add_bos": False}
    for name in ("config.json", "generation_config.json"):
        if (d / name).is_file():
            cfg = read_json(d / name)
            for key in ("bos", "eos"):
                value = cfg.get(f"{key}_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if value is not None:
                    ids[f"{key}_id"] = value
    return ids

"""Reversal-curse evaluation (Berglund et al. 2023, "The Reversal Curse", arXiv 2309.12288).

The data are the paper's fictitious name ↔ description facts (experiment 1). A model is trained
on sentences stated in one order only, then asked for the same fact in that order (paraphrased
held-out prompts) and in the reverse order::

    train     p2d_prompts_train + d2p_prompts_train        "Daphne Barrington, known far and wide for being"
                                                           + " the acclaimed director of ..."
    forward   p2d_prompts_test  + d2p_prompts_test         trained direction, new phrasing
    backward  p2d_reverse_prompts_test + d2p_reverse_prompts_test    the reverse direction

Training text: each sentence is tokens(prompt) + tokens(completion) + EOS, the sentences
concatenated in a seeded order, no padding. Scoring keeps the same conditions: every example is
EOS + prompt + completion (a sentence start as in training) and only the completion tokens are
scored. Reported: forward and backward perplexity of the completions (token-weighted), the gap
backward − forward (closer to 0 is better), and the paper's exact-match accuracy: the greedy
completion of the prompt equals the completion. Greedy decoding reproduces the completion
exactly when, at every completion position, the argmax of the next-token distribution given the
prompt and the *true* earlier completion tokens is the true token, so exact match is read from
the same teacher-forced forward pass (`greedy_complete` decodes for real; a test checks that both agree).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from legolm.data.tokenizer import Tokenizer
from legolm.errors import ConfigError, LegolmError
from legolm.model.transformer import TransformerLM
from legolm.utils.finite import safe_exp

SHARED_DIR = "data/reversal_curse/name_description"


@dataclass
class ReversalConfig:
    """Where the reversal-curse data is and how it is scored.

    Attributes:
        data_dir: Folder of the name_description *.jsonl files (None: the one under LEGOLM_DATA).
        train_files: Files whose sentences make the training text.
        forward_files: Test files in the trained direction.
        backward_files: Test files in the reversed direction.
        batch_size: Examples per forward pass when scoring.
        max_examples: Score only the first N examples of each direction (None: all).
    """

    data_dir: str | None = None
    train_files: list[str] = field(default_factory=lambda: ["p2d_prompts_train", "d2p_prompts_train"])
    forward_files: list[str] = field(default_factory=lambda: ["p2d_prompts_test", "d2p_prompts_test"])
    backward_files: list[str] = field(
        default_factory=lambda: ["p2d_reverse_prompts_test", "d2p_reverse_prompts_test"])
    batch_size: int = 32
    max_examples: int | None = None

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"reversal.batch_size must be >= 1, got {self.batch_size}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"reversal.max_examples must be >= 1, got {self.max_examples}")

    def directory(self) -> Path:
        if self.data_dir is not None:
            return Path(self.data_dir).expanduser()
        from legolm.data.sources import shared_path

        return shared_path(SHARED_DIR)


@dataclass(frozen=True)
class Example:
    """One fact statement: the prompt and the completion the model should give."""

    prompt: str
    completion: str


def read_examples(directory: Path, names: Sequence[str]) -> list[Example]:
    """The examples of ``<directory>/<name>.jsonl`` for each name, in order."""
    examples: list[Example] = []
    for name in names:
        path = directory / f"{name}.jsonl"
        if not path.is_file():
            raise LegolmError(f"reversal data file {path} does not exist; point reversal.data_dir at the "
                              "name_description folder of the reversal-curse data")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                examples.append(Example(str(record["prompt"]), str(record["completion"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LegolmError(f"{path}:{n} is not a {{\"prompt\", \"completion\"}} JSON line") from None
    if not examples:
        raise LegolmError(f"no reversal examples in {directory} for {list(names)}")
    return examples


def _eos(tokenizer: Tokenizer) -> int:
    if tokenizer.eos_id is None:
        raise ConfigError("the reversal evaluation separates sentences with EOS; use a tokenizer that has one")
    return tokenizer.eos_id


def encode(tokenizer: Tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids), tokenized apart so the completion's tokens are known exactly."""
    return tokenizer.encode(ex.prompt), tokenizer.encode(ex.completion)


def training_ids(tokenizer: Tokenizer, cfg: ReversalConfig, seed: int) -> np.ndarray:
    """The training text as one token stream: prompt + completion + EOS per sentence, seeded order."""
    examples = read_examples(cfg.directory(), cfg.train_files)
    order = np.random.default_rng(seed).permutation(len(examples))
    eos = _eos(tokenizer)
    ids: list[int] = []
    for i in order:
        prompt, completion = encode(tokenizer, examples[i])
        ids += prompt + completion + [eos]
    return np.asarray(ids, dtype=np.int64)


@dataclass
class DirectionScore:
    """Scores of one direction.

    Attributes:
        nll_sum: Summed -log p of the completion tokens.
        n_tokens: Completion tokens scored.
        n_examples: Examples scored.
        n_exact: Examples whose greedy completion equals the completion.
    """

    nll_sum: float
    n_tokens: int
    n_examples: int
    n_exact: int

    @property
    def ppl(self) -> float:
        return safe_exp(self.nll_sum / self.n_tokens)

    @property
    def accuracy(self) -> float:
        return self.n_exact / self.n_examples


@dataclass
class ReversalResult:
    """Forward (trained direction) and backward (reversed) scores."""

    forward: DirectionScore
    backward: DirectionScore

    @property
    def gap(self) -> float:
        """Backward − forward perplexity (0: no reversal curse)."""
        return self.backward.ppl - self.forward.ppl

    def to_dict(self) -> dict[str, float]:
        return {"forward_ppl": self.forward.ppl, "backward_ppl": self.backward.ppl, "gap": self.gap,
                "forward_acc": self.forward.accuracy, "backward_acc": self.backward.accuracy,
                "forward_examples": self.forward.n_examples, "backward_examples": self.backward.n_examples}


@torch.no_grad()
def score_examples(model: TransformerLM, tokenizer: Tokenizer, examples: Sequence[Example],
                   batch_size: int) -> DirectionScore:
    """Completion NLL and greedy exact match of each example, EOS + prompt + completion per row.

    Rows are right-padded within a batch; padding comes after every scored position, so causal
    layers (memory layers included: their memory only flows forward) never see it.
    """
    eos = _eos(tokenizer)
    device = next(model.parameters()).device
    nll_sum, n_tokens, n_exact = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        rows = [encode(tokenizer, ex) for ex in examples[start:start + batch_size]]
        seqs = [[eos, *p, *c] for p, c in rows]
        longest = max(len(s) for s in seqs)
        if longest > model.config.block_size:
            raise ConfigError(f"a reversal example has {longest} tokens, more than the model's block_size "
                              f"{model.config.block_size}")
        idx = torch.tensor([s + [eos] * (longest - len(s)) for s in seqs], device=device)  # (B, T)
        logits = model(idx).float()  # (B, T, V)
        for b, (p, c) in enumerate(rows):
            first = 1 + len(p)  # position of the first completion token
            pred = logits[b, first - 1:first - 1 + len(c)]  # (len(c), V): predictions of the completion
            target = idx[b, first:first + len(c)]
            nll_sum += float(F.cross_entropy(pred, target, reduction="sum"))
            n_tokens += len(c)
            n_exact += bool((pred.argmax(-1) == target).all())
    return DirectionScore(nll_sum, n_tokens, len(examples), n_exact)


def evaluate_reversal(model: TransformerLM, tokenizer: Tokenizer, cfg: ReversalConfig) -> ReversalResult:
    """Forward and backward perplexity and exact-match accuracy of ``model`` (put in eval mode)."""
    cfg.validate()
    directory = cfg.directory()
    was_training = model.training
    model.eval()
    try:
        scores = []
        for names in (cfg.forward_files, cfg.backward_files):
            examples = read_examples(directory, names)[: cfg.max_examples]
            scores.append(score_examples(model, tokenizer, examples, cfg.batch_size))
    finally:
        model.train(was_training)
    return ReversalResult(*scores)


@torch.no_grad()
def greedy_complete(model: TransformerLM, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by recomputing ``model(ids)`` for each new token (no KV cache).

    Slow (quadratic) but valid for every layer type, memory layers included, which the
    KV-cached decoder refuses.
    """
    device = next(model.parameters()).device
    ids: Tensor = torch.tensor([list(prompt)], device=device)  # (1, T)
    for _ in range(max_new_tokens):
        if ids.shape[1] >= model.config.block_size:
            break
        nxt = model(ids)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0, len(prompt):].tolist()

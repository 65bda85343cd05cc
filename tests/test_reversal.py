"""Reversal-curse evaluation on the real Berglund et al. data: training text, scoring alignment on
models with known outputs, and exact match from the teacher-forced pass = real greedy decoding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from legolm.data.tokenizer import Tokenizer, train_bpe
from legolm.errors import LegolmError
from legolm.eval.reversal import (
    Example,
    ReversalConfig,
    encode,
    evaluate_reversal,
    greedy_complete,
    read_examples,
    score_examples,
    training_ids,
)
from legolm.generation import GenerationConfig, generate
from legolm.model.factory import create_model
from legolm.model.transformer import TransformerLM
from legolm.train import FitConfig, WindowBatches, fit

VOCAB = 50304  # GPT-2's 50,257 ids rounded up to a multiple of 64
SMALL_VOCAB = 1024


@pytest.fixture(scope="module")
def tok(gpt2_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def data_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "reversal_curse" / "name_description"


def test_training_text_is_every_sentence_once_joined_by_eos_without_padding(tok: Tokenizer, data_dir: Path) -> None:
    cfg = ReversalConfig(data_dir=str(data_dir))
    ids = training_ids(tok, cfg, seed=0)
    examples = read_examples(data_dir, ["p2d_prompts_train", "d2p_prompts_train"])
    assert len(examples) == 1800
    eos = tok.eos_id
    assert ids[-1] == eos and int((ids == eos).sum()) == len(examples)  # one EOS after each sentence, nothing else
    sentences = [tok.decode(s[:-1].tolist()) for s in np.split(ids, np.flatnonzero(ids == eos) + 1)[:-1]]
    assert sorted(sentences) == sorted(e.prompt + e.completion for e in examples)
    assert not np.array_equal(ids, training_ids(tok, cfg, seed=1)), "the order is drawn from the seed"
    assert np.array_equal(ids, training_ids(tok, cfg, seed=0))


class _KnownLogits(nn.Module):
    """A stand-in LM with known outputs: uniform logits, or an 'oracle' that gives logit ``a`` to the
    next input token (reading ahead, which only a test double may do) and 0 elsewhere."""

    def __init__(self, oracle: bool, a: float = 2.0) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.oracle, self.a = oracle, a
        self.config = create_model("pythia", base="tiny-pythia", num_layers=1, vocab_size=VOCAB).config

    def forward(self, idx: Tensor) -> Tensor:
        logits = torch.zeros(*idx.shape, VOCAB)
        if self.oracle:
            logits[:, :-1].scatter_(-1, idx[:, 1:, None], self.a)
        return logits


def test_scores_by_hand_on_models_with_known_outputs(tok: Tokenizer, data_dir: Path) -> None:
    """Uniform logits: every completion token has p = 1/V, so PPL = V and no exact match. The oracle
    gives the true token p = e^a / (e^a + V - 1) at every completion position (an off-by-one would
    score other tokens), so PPL = 1/p and every greedy completion matches."""
    examples = read_examples(data_dir, ["p2d_prompts_test"])[:10]
    n_tokens = sum(len(encode(tok, e)[1]) for e in examples)
    uniform = score_examples(_KnownLogits(oracle=False), tok, examples, batch_size=4)
    assert uniform.n_tokens == n_tokens and uniform.n_exact == 0
    assert math.isclose(uniform.ppl, VOCAB, rel_tol=1e-5)
    oracle = score_examples(_KnownLogits(oracle=True), tok, examples, batch_size=3)
    p = math.exp(2.0) / (math.exp(2.0) + VOCAB - 1)
    assert math.isclose(oracle.ppl, 1 / p, rel_tol=1e-4)  # fp32 log-softmax over 50k logits
    assert oracle.n_exact == len(examples) and oracle.accuracy == 1.0


def test_evaluate_reversal_reads_both_directions(tok: Tokenizer, data_dir: Path) -> None:
    cfg = ReversalConfig(data_dir=str(data_dir), max_examples=6, batch_size=4)
    result = evaluate_reversal(_KnownLogits(oracle=False), tok, cfg)
    assert result.forward.n_examples == result.backward.n_examples == 6
    assert abs(result.gap) < 1e-5 * VOCAB  # uniform: both directions have PPL = V (fp32 rounding)
    assert set(result.to_dict()) >= {"forward_ppl", "backward_ppl", "gap", "forward_acc", "backward_acc"}


@pytest.fixture(scope="module")
def small_tok(data_dir: Path) -> Tokenizer:
    """A 1,024-token byte-level BPE trained on the training sentences (keeps the models below tiny)."""
    examples = read_examples(data_dir, ["p2d_prompts_train", "d2p_prompts_train"])
    return train_bpe([e.prompt + e.completion for e in examples], SMALL_VOCAB)


@pytest.fixture(scope="module")
def memorised(small_tok: Tokenizer, data_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, TransformerLM]:
    """Tiny pythia and infini models trained by `fit` on 12 real training sentences until they recite some."""
    sub = tmp_path_factory.mktemp("reversal_sub")
    for name in ("p2d_prompts_train", "d2p_prompts_train"):
        lines = (data_dir / f"{name}.jsonl").read_text().splitlines()[:6]
        (sub / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    ids = training_ids(small_tok, ReversalConfig(data_dir=str(sub)), seed=0)
    models = {}
    for kind in ("pythia", "infini"):
        torch.manual_seed(0)
        opts = {"segment_len": 16} if kind == "infini" else {}
        model = create_model(kind, base="tiny-pythia", num_layers=2, vocab_size=SMALL_VOCAB, block_size=256, **opts)
        cfg = FitConfig(window=32, batch_size=4, max_steps=120)
        cfg.optim.lr, cfg.schedule.warmup_steps, cfg.eval.every = 1e-2, 10, 0
        cfg.run.out_dir, cfg.run.progress, cfg.run.plot, cfg.run.device = str(sub / kind), False, False, "cpu"
        fit(model, WindowBatches(ids, 32, 4, seed=0), cfg)
        models[kind] = model.eval()
    return models


@pytest.mark.parametrize("kind", ["pythia", "infini"])
def test_exact_match_equals_real_greedy_decoding(kind: str, memorised: dict[str, TransformerLM],
                                                 small_tok: Tokenizer, data_dir: Path) -> None:
    model, tok = memorised[kind], small_tok
    trained = read_examples(data_dir, ["p2d_prompts_train", "d2p_prompts_train"])
    examples: list[Example] = trained[:6] + trained[900:906] + read_examples(data_dir, ["p2d_reverse_prompts_test"])[:4]
    matches = []
    for ex in examples:
        prompt, completion = encode(tok, ex)
        decoded = greedy_complete(model, [tok.eos_id, *prompt], len(completion))
        matches.append(decoded == completion)
        if kind == "pythia":  # the KV-cached decoder agrees with the recomputing one
            cached = generate(model, [[tok.eos_id, *prompt]], GenerationConfig(max_new_tokens=len(completion),
                                                                               greedy=True, stop_at_eos=False))
            assert cached.tokens[0] == decoded
        assert score_examples(model, tok, [ex], batch_size=1).n_exact == int(decoded == completion)
    assert any(matches) and not all(matches), f"need both outcomes for a meaningful check, got {matches}"
    batched = score_examples(model, tok, examples, batch_size=5)  # right padding changes nothing
    assert batched.n_exact == sum(matches)


def test_bad_data_is_one_clear_error(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(LegolmError, match="does not exist") as err:
        evaluate_reversal(_KnownLogits(False), tok, ReversalConfig(data_dir=str(tmp_path)))
    assert "\n" not in str(err.value)
    (tmp_path / "p2d_prompts_test.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(LegolmError, match=r"p2d_prompts_test.jsonl:1 is not"):
        read_examples(tmp_path, ["p2d_prompts_test"])

"""Tiny random Hugging Face models (GPT-2, GPT-NeoX, Llama) for parity tests.

Weights are re-drawn with a larger spread than HF's N(0, 0.02) init so that logits differ by
whole units between tokens: a wrong layout (a transposed matrix, a mis-rotated head) then moves
them far beyond the tolerance, and greedy decoding has no near-ties.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

VOCAB = 97
BOS, EOS, PAD = 1, 2, 0


def _config(kind: str) -> transformers.PretrainedConfig:
    common: dict[str, Any] = dict(vocab_size=VOCAB, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if kind in ("gpt2", "gpt2-untied"):
        return transformers.GPT2Config(
            n_positions=64, n_embd=64, n_layer=2, n_head=4, layer_norm_epsilon=1e-5,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=kind == "gpt2", **common,
        )
    if kind == "neox":  # the transformers 4.x keyword, converted by transformers 5 into rope_parameters
        return transformers.GPTNeoXConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, rotary_pct=0.25, layer_norm_eps=1e-5, hidden_dropout=0.0,
            attention_dropout=0.0, **common,
        )
    if kind == "neox-rope-params":  # the transformers 5 way, non-default theta and fraction
        return transformers.GPTNeoXConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, layer_norm_eps=1e-5, hidden_dropout=0.0, attention_dropout=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
            **common,
        )
    if kind in ("llama-tied", "llama-untied"):
        return transformers.LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=64, rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
            tie_word_embeddings=kind == "llama-tied", **common,
        )
    raise ValueError(kind)


KINDS = ["gpt2", "gpt2-untied", "neox", "neox-rope-params", "llama-tied", "llama-untied"]


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, eos_row: int | None = EOS) -> torch.nn.Module:
    """Re-draw every parameter (matrices ~N(0, 0.15), norm gains ~1 ± 0.2, biases ~N(0, 0.1)).

    The output-embedding row of ``eos_row`` is zeroed: its logit is then 0 while the best of the
    other 96 logits is positive, so greedy decoding never picks EOS. (Hugging Face's
    ``min_new_tokens`` forbids EOS; legolm without EOS stopping may pick it; the two would differ.)
    """
    g = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        elif "norm" in name or "ln_" in name or name.endswith(("ln_f.weight",)):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                    else 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    if eos_row is not None:
        out = model.get_output_embeddings()
        out.weight[eos_row].zero_()
    return model


def make_hf(kind: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny randomly initialised HF causal LM of family ``kind`` in eval mode, fp32."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind))
    return randomize_(model.float().eval(), seed)


def save_hf(kind: str, directory: Path, seed: int = 0) -> tuple[transformers.PreTrainedModel, Path]:
    model = make_hf(kind, seed)
    model.save_pretrained(directory)
    return model, directory

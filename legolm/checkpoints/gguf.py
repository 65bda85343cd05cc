"""GGUF files (llama.cpp): Llama-architecture weights, dequantised to float32 on load, and the tokenizer.

llama.cpp stores q/k projection rows permuted for its interleaved RoPE; they are permuted back to
the half-split layout legolm (and Hugging Face) use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from legolm.core.config import ModelConfig
from legolm.data.tokenizer import Tokenizer
from legolm.errors import CheckpointError
from legolm.model.transformer import check_shapes
from legolm.utils.gguf_file import gguf_reader, read_fields

_LAYER_KEYS = {
    "attn_norm.weight": "norm_1.weight",
    "ffn_norm.weight": "norm_2.weight",
    "attn_q.weight": "attn.qkv.q_proj.weight",
    "attn_k.weight": "attn.qkv.k_proj.weight",
    "attn_v.weight": "attn.qkv.v_proj.weight",
    "attn_output.weight": "attn.proj.weight",
    "ffn_gate.weight": "mlp.gate.weight",
    "ffn_up.weight": "mlp.up.weight",
    "ffn_down.weight": "mlp.down.weight",
}
_TOP_KEYS = {"token_embd.weight": "wte.weight", "output_norm.weight": "norm.weight", "output.weight": "lm_head.weight"}


def _unpermute(w: Tensor, n_head: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> half-split rotary layout)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


def _shape(t: Any) -> tuple[int, ...]:
    """A GGUF tensor's shape in torch order (GGML lists dims fastest-first)."""
    return tuple(int(d) for d in reversed(t.shape))


def _tensor(t: Any) -> Tensor:
    from gguf.quants import dequantize

    return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(_shape(t)))


def gguf_config(fields: dict[str, Any], name: str) -> ModelConfig:
    """The `ModelConfig` a llama GGUF file describes; a missing or ill-typed field is one `CheckpointError` line."""
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; legolm reads 'llama' GGUF files")
    try:
        return _llama_config(fields, name)
    except KeyError as err:
        raise CheckpointError(f"GGUF file {name} lacks the field {err}") from None
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise CheckpointError(f"GGUF file {name} has an ill-typed or zero size field ({err})") from None


def _llama_config(fields: dict[str, Any], name: str) -> ModelConfig:
    n_head = int(fields["llama.attention.head_count"])
    n_embd = int(fields["llama.embedding_length"])
    if n_head < 1:  # before the head width n_embd // n_head is taken
        raise CheckpointError(f"GGUF file {name}: llama.attention.head_count is {n_head}; a llama model has at "
                              "least one attention head (a damaged or hand-edited file?)")
    vocab = fields.get("llama.vocab_size") or len(fields["tokenizer.ggml.tokens"])
    return ModelConfig(
        layers=["llama"] * int(fields["llama.block_count"]), vocab_size=int(vocab), n_embd=n_embd, n_head=n_head,
        n_kv_head=int(fields.get("llama.attention.head_count_kv", n_head)),
        head_dim=int(fields.get("llama.attention.key_length", n_embd // n_head)),
        intermediate_size=int(fields["llama.feed_forward_length"]), block_size=int(fields["llama.context_length"]),
        norm="rmsnorm", norm_eps=float(fields["llama.attention.layer_norm_rms_epsilon"]), activation="silu",
        attn_bias=False, mlp_bias=False, positions="rope", rope_base=float(fields.get("llama.rope.freq_base", 1e4)),
        tie_embeddings=False, bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=fields.get("tokenizer.ggml.eos_token_id"), name=name,
    )


def _key(name: str, config: ModelConfig) -> tuple[str | None, int]:
    """legolm key of a GGUF tensor, and the head count to un-permute by (0: none)."""
    if name in _TOP_KEYS:
        return _TOP_KEYS[name], 0
    if not name.startswith("blk."):
        return None, 0  # e.g. rope_freqs of llama3-style files
    _, idx, rest = name.split(".", 2)
    if rest not in _LAYER_KEYS:
        raise CheckpointError(f"GGUF tensor {name!r} is not part of a llama block legolm knows")
    heads = {"attn_q.weight": config.n_head, "attn_k.weight": config.kv_heads}.get(rest, 0)
    return f"blocks.{idx}.{_LAYER_KEYS[rest]}", heads


def load_gguf(path: Path) -> tuple[ModelConfig, dict[str, Tensor], Tokenizer]:
    """Config, dequantised legolm-named state dict and tokenizer of a GGUF file.

    The tensors' shapes (from the file's header) are checked against the metadata's config first,
    on the meta device, so a file whose sizes disagree is one line before anything is dequantised.
    """
    reader = gguf_reader(path)
    fields = read_fields(reader)
    config = gguf_config(fields, path.stem)
    tensors = {key: (t, heads) for t in reader.tensors for key, heads in [_key(t.name, config)] if key is not None}
    config.tie_embeddings = "lm_head.weight" not in tensors
    layout = {key: _placed(torch.empty(_shape(t), device="meta"), heads, t.name) for key, (t, heads) in tensors.items()}
    check_shapes(config, layout, "the GGUF metadata")
    tokenizer = Tokenizer.from_gguf_fields(fields)  # a broken vocabulary also fails before the big work
    state = {key: _placed(_tensor(t), heads, t.name) for key, (t, heads) in tensors.items()}
    return config, state, tokenizer


def _placed(w: Tensor, heads: int, name: str) -> Tensor:
    """``w`` in legolm's layout: q/k rows un-permuted by ``heads`` (0: as stored)."""
    if not heads:
        return w
    if w.shape[0] % (2 * heads):
        raise CheckpointError(f"GGUF tensor {name} has {w.shape[0]} rows, which {heads} heads cannot split into "
                              "rotary pairs; the file's head counts do not match its weights")
    return _unpermute(w, heads)

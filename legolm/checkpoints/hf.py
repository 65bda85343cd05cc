"""Hugging Face checkpoints: GPT-2, GPT-NeoX / Pythia and Llama, in and out.

Each family is a table of key rules (HF name <-> legolm name, with a tensor transform where the
layouts differ) plus its config mapping. The transforms:

* GPT-2's ``Conv1D`` stores weights as (in, out): transposed to ``nn.Linear``'s (out, in).
* GPT-NeoX fuses q/k/v interleaved per head, rows [h0: q k v | h1: q k v | ...]: regrouped to
  legolm's [q heads | k heads | v heads].
* Llama keeps separate q/k/v projections, as legolm's ``SplitQKV`` does.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from legolm.core.config import ModelConfig
from legolm.errors import CheckpointError, LegolmError
from legolm.model.transformer import check_shapes
from legolm.model.validate import SAFETENSORS_DTYPES, meta_state
from legolm.utils.io import read_json

Transform = Callable[[Tensor, ModelConfig], Tensor]


def _transpose(t: Tensor, c: ModelConfig) -> Tensor:
    return t.t().contiguous() if t.dim() == 2 else t


def _neox_qkv_in(t: Tensor, c: ModelConfig) -> Tensor:
    return t.view(c.n_head, 3, c.hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


def _neox_qkv_out(t: Tensor, c: ModelConfig) -> Tensor:
    return t.view(3, c.n_head, c.hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape).contiguous()


@dataclass(frozen=True)
class Rule:
    """One HF key pattern <-> one legolm key pattern (``{i}`` = layer, ``{p}`` = weight|bias)."""

    hf: str
    ours: str
    to_ours: Transform | None = None
    to_hf: Transform | None = None

    def _regex(self, template: str) -> re.Pattern[str]:
        pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        return re.compile(pattern + "$")

    def match(self, key: str, hf_side: bool) -> str | None:
        """The other side's key for ``key``, or None."""
        m = self._regex(self.hf if hf_side else self.ours).match(key)
        if m is None:
            return None
        return (self.ours if hf_side else self.hf).format(**m.groupdict())


@dataclass(frozen=True)
class Family:
    """How one Hugging Face architecture maps onto legolm."""

    model_type: str
    architecture: str
    layer: str
    rules: list[Rule]
    config_in: Callable[[dict[str, Any]], dict[str, Any]]
    config_out: Callable[[ModelConfig], dict[str, Any]]
    ignore: tuple[str, ...] = field(default=())  # non-weight buffers of old checkpoints


def _rope(cfg: dict[str, Any], default_pct: float) -> dict[str, Any]:
    """RoPE base and rotary fraction from transformers 4.x names or 5.x ``rope_parameters``."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise CheckpointError(f"RoPE scaling {kind!r} is not supported by legolm yet; use a model without rope_scaling")
    base = params.get("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0)))
    pct = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", cfg.get("rotary_pct", default_pct)))
    return {"rope_base": float(base), "rotary_pct": float(pct)}


def _ids(cfg: dict[str, Any]) -> dict[str, Any]:
    def first(v: Any) -> Any:
        return (v[0] if v else None) if isinstance(v, list) else v
    return {"bos_token_id": first(cfg.get("bos_token_id")), "eos_token_id": first(cfg.get("eos_token_id"))}


# -- GPT-2 -------------------------------------------------------------------------------------
def _gpt2_in(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise CheckpointError("GPT-2 with scale_attn_by_inverse_layer_idx=true is not supported")
    act = cfg.get("activation_function", "gelu_new")
    n_embd = cfg["n_embd"]
    return dict(
        layers=["gpt2"] * cfg["n_layer"], vocab_size=cfg["vocab_size"], n_embd=n_embd, n_head=cfg["n_head"],
        intermediate_size=cfg.get("n_inner") or 4 * n_embd, block_size=cfg["n_positions"], norm="layernorm",
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5), activation="gelu_tanh" if act in ("gelu_new", "gelu_pytorch_tanh")
        else "gelu", positions="learned", tie_embeddings=cfg.get("tie_word_embeddings", True), **_ids(cfg),
    )


def _gpt2_out(c: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=c.intermediate_size, layer_norm_epsilon=c.norm_eps, tie_word_embeddings=c.tie_embeddings,
        activation_function="gelu_new" if c.activation == "gelu_tanh" else "gelu",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )


_P = "transformer.h.{i}."
GPT2 = Family("gpt2", "GPT2LMHeadModel", "gpt2", [
    Rule("transformer.wte.weight", "wte.weight"),
    Rule("transformer.wpe.weight", "wpe.weight"),
    Rule(_P + "ln_1.{p}", "blocks.{i}.norm_1.{p}"),
    Rule(_P + "ln_2.{p}", "blocks.{i}.norm_2.{p}"),
    Rule(_P + "attn.c_attn.{p}", "blocks.{i}.attn.qkv.{p}", _transpose, _transpose),
    Rule(_P + "attn.c_proj.{p}", "blocks.{i}.attn.proj.{p}", _transpose, _transpose),
    Rule(_P + "mlp.c_fc.{p}", "blocks.{i}.mlp.fc.{p}", _transpose, _transpose),
    Rule(_P + "mlp.c_proj.{p}", "blocks.{i}.mlp.proj.{p}", _transpose, _transpose),
    Rule("transformer.ln_f.{p}", "norm.{p}"),
    Rule("lm_head.weight", "lm_head.weight"),
], _gpt2_in, _gpt2_out, ignore=(r"\.attn\.(masked_)?bias$",))


# -- GPT-NeoX / Pythia -------------------------------------------------------------------------
def _neox_in(cfg: dict[str, Any]) -> dict[str, Any]:
    if not cfg.get("use_parallel_residual", True):
        raise CheckpointError("GPT-NeoX with use_parallel_residual=false is not supported (Pythia uses true)")
    act = cfg.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"GPT-NeoX hidden_act {act!r} is not supported; expected gelu")
    return dict(
        layers=["pythia"] * cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"], n_embd=cfg["hidden_size"],
        n_head=cfg["num_attention_heads"], intermediate_size=cfg["intermediate_size"],
        block_size=cfg["max_position_embeddings"], norm="layernorm", norm_eps=cfg.get("layer_norm_eps", 1e-5),
        activation="gelu" if act == "gelu" else "gelu_tanh", attn_bias=cfg.get("attention_bias", True),
        positions="rope", tie_embeddings=cfg.get("tie_word_embeddings", False), **_rope(cfg, 0.25), **_ids(cfg),
    )


def _neox_out(c: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        intermediate_size=c.intermediate_size, max_position_embeddings=c.block_size, layer_norm_eps=c.norm_eps,
        hidden_act="gelu" if c.activation == "gelu" else "gelu_pytorch_tanh", rotary_pct=c.rotary_pct,
        rotary_emb_base=c.rope_base, partial_rotary_factor=c.rotary_pct, rope_theta=c.rope_base,
        use_parallel_residual=True, tie_word_embeddings=c.tie_embeddings, attention_bias=c.attn_bias,
        hidden_dropout=0.0, attention_dropout=0.0,
    )


_N = "gpt_neox.layers.{i}."
NEOX = Family("gpt_neox", "GPTNeoXForCausalLM", "pythia", [
    Rule("gpt_neox.embed_in.weight", "wte.weight"),
    Rule(_N + "input_layernorm.{p}", "blocks.{i}.norm_1.{p}"),
    Rule(_N + "post_attention_layernorm.{p}", "blocks.{i}.norm_2.{p}"),
    Rule(_N + "attention.query_key_value.{p}", "blocks.{i}.attn.qkv.{p}", _neox_qkv_in, _neox_qkv_out),
    Rule(_N + "attention.dense.{p}", "blocks.{i}.attn.proj.{p}"),
    Rule(_N + "mlp.dense_h_to_4h.{p}", "blocks.{i}.mlp.fc.{p}"),
    Rule(_N + "mlp.dense_4h_to_h.{p}", "blocks.{i}.mlp.proj.{p}"),
    Rule("gpt_neox.final_layer_norm.{p}", "norm.{p}"),
    Rule("embed_out.weight", "lm_head.weight"),
    Rule("lm_head.weight", "lm_head.weight"),  # transformers >= 5 names the head lm_head in state_dict()
], _neox_in, _neox_out, ignore=(r"\.attention\.(masked_)?bias$", r"rotary_emb\.inv_freq$"))


# -- Llama -------------------------------------------------------------------------------------
def _llama_in(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"Llama hidden_act {cfg.get('hidden_act')!r} is not supported; expected silu")
    n_head = cfg["num_attention_heads"]
    return dict(
        layers=["llama"] * cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"], n_embd=cfg["hidden_size"],
        n_head=n_head, n_kv_head=cfg.get("num_key_value_heads") or n_head, head_dim=cfg.get("head_dim"),
        intermediate_size=cfg["intermediate_size"], block_size=cfg["max_position_embeddings"], norm="rmsnorm",
        norm_eps=cfg.get("rms_norm_eps", 1e-6), activation="silu", attn_bias=cfg.get("attention_bias", False),
        mlp_bias=cfg.get("mlp_bias", False), positions="rope", tie_embeddings=cfg.get("tie_word_embeddings", False),
        **_rope(cfg, 1.0), **_ids(cfg),
    )


def _llama_out(c: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base, hidden_act="silu",
        tie_word_embeddings=c.tie_embeddings, attention_bias=c.attn_bias, mlp_bias=c.mlp_bias,
    )


_L = "model.layers.{i}."
LLAMA = Family("llama", "LlamaForCausalLM", "llama", [
    Rule("model.embed_tokens.weight", "wte.weight"),
    Rule(_L + "input_layernorm.weight", "blocks.{i}.norm_1.weight"),
    Rule(_L + "post_attention_layernorm.weight", "blocks.{i}.norm_2.weight"),
    Rule(_L + "self_attn.q_proj.{p}", "blocks.{i}.attn.qkv.q_proj.{p}"),
    Rule(_L + "self_attn.k_proj.{p}", "blocks.{i}.attn.qkv.k_proj.{p}"),
    Rule(_L + "self_attn.v_proj.{p}", "blocks.{i}.attn.qkv.v_proj.{p}"),
    Rule(_L + "self_attn.o_proj.{p}", "blocks.{i}.attn.proj.{p}"),
    Rule(_L + "mlp.gate_proj.{p}", "blocks.{i}.mlp.gate.{p}"),
    Rule(_L + "mlp.up_proj.{p}", "blocks.{i}.mlp.up.{p}"),
    Rule(_L + "mlp.down_proj.{p}", "blocks.{i}.mlp.down.{p}"),
    Rule("model.norm.weight", "norm.weight"),
    Rule("lm_head.weight", "lm_head.weight"),
], _llama_in, _llama_out, ignore=(r"rotary_emb\.inv_freq$",))

FAMILIES: dict[str, Family] = {f.model_type: f for f in (GPT2, NEOX, LLAMA)}


def family_for(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"unsupported architecture {model_type!r} in config.json; legolm loads {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type]


def config_from_hf(cfg: dict[str, Any], name: str = "custom") -> tuple[Family, ModelConfig]:
    """Translate a Hugging Face ``config.json`` dict."""
    family = family_for(cfg.get("model_type"))
    try:
        return family, ModelConfig.from_dict({**family.config_in(cfg), "name": name})
    except KeyError as err:
        raise CheckpointError(f"config.json lacks {err} needed for a {family.model_type} model") from None
    except (TypeError, ValueError, ZeroDivisionError) as err:  # e.g. a size given as a string
        raise CheckpointError(f"config.json of this {family.model_type} model has an ill-typed value ({err}); "
                              "fix the file") from None


def convert_state(state: dict[str, Tensor], family: Family, config: ModelConfig, to_hf: bool) -> dict[str, Tensor]:
    """Rename (and re-layout) every tensor between Hugging Face and legolm names."""
    out: dict[str, Tensor] = {}
    for original, tensor in state.items():
        key = original
        if not to_hf:
            if family.model_type == "gpt2" and not key.startswith(("transformer.", "lm_head.")):
                key = "transformer." + key  # GPT2Model checkpoints (e.g. the original `gpt2`) lack the prefix
            if any(re.search(p, key) for p in family.ignore):
                continue
        for rule in family.rules:
            other = rule.match(key, hf_side=not to_hf)
            if other is not None:
                fn = rule.to_hf if to_hf else rule.to_ours
                out[other] = _relayout(fn, tensor, config, original, family) if fn else tensor
                break
        else:
            raise CheckpointError(f"tensor {original!r} has no {family.model_type} mapping; is the checkpoint complete "
                                  "and of the architecture its config.json names?")
    return out


def _relayout(fn: Transform, tensor: Tensor, config: ModelConfig, key: str, family: Family) -> Tensor:
    """``fn(tensor, config)``; a tensor whose shape the config's heads cannot split is one `CheckpointError`."""
    try:
        return fn(tensor, config)
    except RuntimeError:
        raise CheckpointError(f"tensor {key!r} of shape {tuple(tensor.shape)} does not fit a {family.model_type} "
                              f"model of n_head={config.n_head}, head_dim={config.hd}; config.json does not match "
                              "the weights") from None


def read_shapes(directory: Path) -> dict[str, Tensor]:
    """The weights of `read_weights` as meta tensors of their shapes: safetensors headers only, nothing read."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:  # pytorch_model.bin: no header to read; memory-mapped, its shapes cost no reads either
        weights = _read_bin(directory, mmap=True)
        return meta_state({k: v.shape for k, v in weights.items()}, {k: v.dtype for k, v in weights.items()})
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, torch.dtype] = {}
    with _reading(directory):
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for k in handle.keys():  # noqa: SIM118 (no __iter__)
                    header = handle.get_slice(k)
                    shapes[k] = header.get_shape()
                    dtypes[k] = SAFETENSORS_DTYPES.get(header.get_dtype(), torch.float32)
    return meta_state(shapes, dtypes)


def read_weights(directory: Path) -> dict[str, Tensor]:
    """Read safetensors (single or sharded) or, failing that, pytorch_model.bin with weights_only=True."""
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return _read_bin(directory, mmap=False)
    state: dict[str, Tensor] = {}
    with _reading(directory):
        for f in files:
            state.update(load_file(str(f)))
    return state


def _read_bin(directory: Path, mmap: bool) -> dict[str, Tensor]:
    if not (directory / "pytorch_model.bin").is_file():
        raise CheckpointError(f"no weights in {directory}: expected *.safetensors or pytorch_model.bin")
    path = directory / "pytorch_model.bin"
    with _reading(directory):  # memory-mapped only in the zip format torch.save writes since 1.6
        return dict(torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path)))


@contextmanager
def _reading(directory: Path) -> Iterator[None]:
    """Errors of reading the weight files in ``directory`` as one `CheckpointError` line."""
    from safetensors import SafetensorError

    try:
        yield
    except pickle.UnpicklingError:
        raise CheckpointError(f"{directory / 'pytorch_model.bin'} holds Python objects other than tensors and "
                              "is refused (loaded with weights_only=True); save its state dict as "
                              "safetensors") from None
    except (SafetensorError, OSError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read the weights in {directory} ({first}); the file is truncated or "
                              "corrupt: download it again") from None


def load_hf_dir(directory: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Config and legolm-named state dict of a local Hugging Face model directory."""
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; expected a Hugging Face model directory")
    try:
        hf_cfg = read_json(cfg_path)
    except LegolmError as err:
        raise CheckpointError(str(err)) from None
    family, config = config_from_hf(hf_cfg, name=directory.name)
    # names, layouts and shapes first, on the meta device: a config that does not fit is one line, before any read
    check_shapes(config, convert_state(read_shapes(directory), family, config, to_hf=False), "config.json")
    state = convert_state(read_weights(directory), family, config, to_hf=False)
    return config, state


def export_hf_state(config: ModelConfig, state: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """HF ``config.json`` dict and HF-named tensors for a single-family legolm model."""
    kinds = set(config.layers)
    family = next((f for f in FAMILIES.values() if kinds == {f.layer}), None)
    if family is None:
        raise CheckpointError(f"layers {sorted(kinds)} have no Hugging Face equivalent; export needs one of "
                              f"{sorted(f.layer for f in FAMILIES.values())} throughout")
    if config.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    hf_cfg = {"model_type": family.model_type, "architectures": [family.architecture], **family.config_out(config),
              "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    return hf_cfg, convert_state(state, family, config, to_hf=True)

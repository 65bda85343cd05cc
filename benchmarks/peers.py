"""The peers the benchmarks measure legolm against beside transformers and eager peft: litgpt and compiled peft.

Neither is a dependency of legolm (the ``bench`` extra installs litgpt; peft is the ``peft`` extra). Each
benchmark asks `missing` first: a peer that cannot be imported gives a row reading "not installed",
never a crash. On the GPU machine litgpt travels as its pure-Python wheel in the git-ignored
``.whl/`` (the README's Benchmarks section has the recipe).

litgpt rows start from the same initial weights as every other row through litgpt's own converter:
the transformers model's state dict goes through
``litgpt.scripts.convert_hf_checkpoint.copy_weights_gpt_neox`` (what ``litgpt convert_to_litgpt``
runs on a Hugging Face checkpoint) into a `litgpt.GPT` (pretraining, decoding) or a
`litgpt.lora.GPT` (LoRA). litgpt has GPT-NeoX (Pythia) but no GPT-2 (it has no learned position
embeddings), so its rows on GPT-2 shapes read "not supported".

Compiled peers run through the same `TrainStep` as legolm with ``compile=True`` (the whole loss
call under `torch.compile`); `train_step` lets the CPU smoke runs pick a cheap backend
(``aot_eager``) for every compiled row alike.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from legolm.adapters import LoRAConfig
from legolm.core.config import ModelConfig
from legolm.train.batches import Batch
from legolm.train.fit import LossFn, LossOutput, TrainStep
from legolm.train.optim import LRSchedule

PEERS = ["litgpt", "peft-compile"]  # the rows a benchmark's --peers picks from
LITGPT = "litgpt.lora"  # what the litgpt rows import (it imports litgpt.model, litgpt.config and lightning)


def missing(module: str) -> str | None:
    """None when ``module`` imports, else why not: "not installed" or the import error's first line."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        return "not installed" if err.name == top else f"not installed ({err.name} missing)"
    except Exception as err:  # a peer that is there but breaks on import is reported, not fatal
        return f"import failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def failure(err: BaseException) -> str:
    """A peer row's note when the peer broke at run time (its traceback goes to stderr; the benchmark goes on)."""
    traceback.print_exception(err, file=sys.stderr)
    first = str(err).splitlines()[0] if str(err) else ""
    return f"failed: {type(err).__name__}: {first}"[:200]


def family_of(config: ModelConfig) -> str:
    """The Hugging Face model_type of a legolm config (its layer type decides)."""
    kinds = set(config.layers)
    if kinds == {"pythia"}:
        return "gpt_neox"
    if kinds == {"gpt2"}:
        return "gpt2"
    if kinds == {"llama"}:
        return "llama"
    return "custom"


def litgpt_unsupported(config: ModelConfig) -> str | None:
    """Why litgpt cannot run this shape here (None when it can: GPT-NeoX / Pythia)."""
    family = family_of(config)
    if family == "gpt2":
        return "not supported: litgpt has no GPT-2 (no learned position embeddings)"
    if family != "gpt_neox":
        return f"not supported here: only GPT-NeoX (Pythia) is wired to litgpt, not {family}"
    if config.tie_embeddings:
        return "not supported: tied embeddings"
    return None


def litgpt_config(config: ModelConfig, lora: LoRAConfig | None = None) -> Any:
    """litgpt's `Config` (or `litgpt.lora.Config` with LoRA) of a legolm GPT-NeoX config."""
    import litgpt.config
    import litgpt.lora

    why = litgpt_unsupported(config)
    if why:
        raise ValueError(why)
    fields: dict[str, Any] = dict(
        name=f"legolm-{config.name}", block_size=config.block_size, n_layer=config.n_layer, n_embd=config.n_embd,
        n_head=config.n_head, n_query_groups=config.n_head, vocab_size=config.vocab_size,
        padded_vocab_size=config.vocab_size, norm_class_name="LayerNorm", norm_eps=config.norm_eps,
        parallel_residual=True, shared_attention_norm=False, bias=config.attn_bias and config.mlp_bias,
        rotary_percentage=config.rotary_pct, rope_base=int(config.rope_base), mlp_class_name="GptNeoxMLP",
        intermediate_size=config.intermediate_size, gelu_approximate="none" if config.activation == "gelu" else "tanh",
        lm_head_bias=False,
    )
    if lora is None:
        return litgpt.config.Config(**fields)
    return litgpt.lora.Config(**fields, lora_r=lora.r, lora_alpha=int(lora.alpha), lora_dropout=lora.dropout,
                              **litgpt_lora_flags(lora.target_modules))


def litgpt_lora_flags(targets: list[str]) -> dict[str, bool]:
    """litgpt's ``lora_*`` switches for peft's GPT-NeoX target names (query_key_value, dense, the MLP pair)."""
    flags = dict.fromkeys(["lora_query", "lora_key", "lora_value", "lora_projection", "lora_mlp"], False)
    mlp = {"dense_h_to_4h", "dense_4h_to_h"}
    for t in targets:
        if t == "query_key_value":
            flags.update(lora_query=True, lora_key=True, lora_value=True)
        elif t == "dense":
            flags["lora_projection"] = True
        elif t in mlp:
            if not mlp <= set(targets):
                raise ValueError("litgpt adapts both MLP projections or neither (lora_mlp): give dense_h_to_4h and "
                                 "dense_4h_to_h together")
            flags["lora_mlp"] = True
        else:
            raise ValueError(f"LoRA target {t!r} has no litgpt switch (query_key_value, dense, dense_h_to_4h, "
                             "dense_4h_to_h)")
    return flags


def litgpt_state(hf_state: dict[str, torch.Tensor], cfg: Any) -> dict[str, torch.Tensor]:
    """A transformers GPT-NeoX state dict in litgpt's names and layout, by litgpt's own converter."""
    from litgpt.scripts.convert_hf_checkpoint import copy_weights_gpt_neox

    renamed = {("embed_out.weight" if k == "lm_head.weight" else k): v for k, v in hf_state.items()
               if not k.endswith(("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias"))}
    out: dict[str, torch.Tensor] = {}
    copy_weights_gpt_neox(cfg, out, renamed)
    return out


def litgpt_model(hf_state: dict[str, torch.Tensor], config: ModelConfig, lora: LoRAConfig | None = None) -> nn.Module:
    """litgpt's `GPT` (or `litgpt.lora.GPT`, only its adapters trainable) holding the transformers weights."""
    import litgpt.lora
    import litgpt.model

    cfg = litgpt_config(config, lora)
    state = litgpt_state(hf_state, cfg)
    if lora is None:
        model: nn.Module = litgpt.model.GPT(cfg)
        model.load_state_dict(state, strict=True)
        return model
    model = litgpt.lora.GPT(cfg)
    result = model.load_state_dict(state, strict=False)  # the lora_A/B matrices are not in a base checkpoint
    if result.unexpected_keys or any("lora_" not in k for k in result.missing_keys):
        raise RuntimeError(f"litgpt state mismatch: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    litgpt.lora.mark_only_lora_as_trainable(model)
    return model


def copy_peft_lora(model: nn.Module, peft_model: Any) -> None:
    """Give litgpt's adapters peft's values: each A from peft's (litgpt's fused-QKV A holds one A per q, k and v, so
    peft's A goes into each) and B from peft's (its fused-QKV rows regrouped as litgpt's converter regroups the
    weight). Then both compute the same update; at the start B is zero in both."""
    from litgpt.scripts.convert_hf_checkpoint import qkv_reassemble

    theirs = dict(peft_model.named_modules())
    pairs = {"attn.qkv": "attention.query_key_value", "attn.proj": "attention.dense",
             "mlp.fc": "mlp.dense_h_to_4h", "mlp.proj": "mlp.dense_4h_to_h"}
    with torch.no_grad():
        for name, module in model.named_modules():
            a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if not (isinstance(a, nn.Parameter) and isinstance(b, nn.Parameter) and name.startswith("transformer.h.")):
                continue
            layer, local = name.split(".")[2], ".".join(name.split(".")[3:])
            peer = theirs[f"base_model.model.gpt_neox.layers.{layer}.{pairs[local]}"]
            peft_a, peft_b = peer.lora_A["default"].weight, peer.lora_B["default"].weight
            a.copy_(peft_a.repeat(a.shape[0] // peft_a.shape[0], 1))
            b.copy_(qkv_reassemble(peft_b, model.config) if local == "attn.qkv" else peft_b)  # type: ignore[arg-type]


def adapters_to_fp32(model: nn.Module) -> nn.Module:
    """The LoRA matrices in fp32 over a bf16 base, as peft keeps its adapters (and legolm's benchmark does)."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return model


def logits_loss(model: nn.Module, batch: Batch) -> LossOutput:
    """Next-token cross-entropy on fp32 logits of a model called as ``model(input_ids)`` (litgpt's GPT)."""
    logits = model(batch["input_ids"])  # (B, T, V)
    labels = batch["labels"]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()), labels.numel(), {}


def hf_logits_loss(model: nn.Module, batch: Batch) -> LossOutput:
    """The same loss on a transformers (or peft) model's output."""
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits  # (B, T, V)
    labels = batch["labels"]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten()), labels.numel(), {}


def compile_kwargs(backend: str, mode: str | None = None) -> dict[str, Any]:
    """`torch.compile` arguments: the mode applies to inductor only (the smoke runs use aot_eager)."""
    return {"mode": mode} if backend == "inductor" else {"backend": backend}


def train_step(model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, schedule: LRSchedule,
               grad_clip: float, autocast: contextlib.AbstractContextManager[Any], device: torch.device,
               compile: bool, backend: str = "inductor", mode: str = "default", cuda_graph: bool = False) -> TrainStep:
    """`TrainStep`, with its loss call compiled by ``backend`` (inductor: exactly ``TrainStep(compile=True)``),
    each step one CUDA graph with ``cuda_graph`` where the loss allows it."""
    if backend == "inductor":
        return TrainStep(model, loss_fn, optimizer, schedule, grad_clip, autocast, device, compile, mode,
                         cuda_graph=cuda_graph)
    step = TrainStep(model, loss_fn, optimizer, schedule, grad_clip, autocast, device, False, cuda_graph=cuda_graph)
    if compile:
        step.run = torch.compile(step.wrapped.runner, backend=backend)
    return step


@contextlib.contextmanager
def litgpt_compile_settings() -> Iterator[None]:
    """The dynamo/inductor settings ``litgpt generate --compile`` sets, undone afterwards (they are global)."""
    import torch._dynamo.config
    import torch._inductor.config

    saved = (torch._dynamo.config.automatic_dynamic_shapes, torch._inductor.config.triton.unique_kernel_names,
             torch._inductor.config.coordinate_descent_tuning)
    torch._dynamo.config.automatic_dynamic_shapes = True
    torch._inductor.config.triton.unique_kernel_names = True
    torch._inductor.config.coordinate_descent_tuning = True
    try:
        yield
    finally:
        (torch._dynamo.config.automatic_dynamic_shapes, torch._inductor.config.triton.unique_kernel_names,
         torch._inductor.config.coordinate_descent_tuning) = saved


class LitgptDecoder:
    """litgpt's own decoding of one prompt (``litgpt.generate.base.generate``: greedy at temperature 0), its KV cache
    sized for prompt + new tokens; ``compile`` swaps litgpt's ``next_token`` for its compiled form as
    ``litgpt generate --compile`` does (``torch.compile(next_token, mode="reduce-overhead")``)."""

    def __init__(self, model: nn.Module, prompt_tokens: int, new_tokens: int, batch: int, compile: bool,
                 backend: str = "inductor") -> None:
        import litgpt.generate.base as base

        self.model, self.base, self.new, self.batch = model, base, new_tokens, batch
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        model.max_seq_length = prompt_tokens + new_tokens  # type: ignore[assignment]
        model.set_kv_cache(batch_size=batch, device=device, dtype=dtype)  # type: ignore[operator]
        self.original = base.next_token
        self.compiled = torch.compile(self.original, **compile_kwargs(backend, "reduce-overhead")) if compile \
            else None

    def __call__(self, prompts: torch.Tensor) -> list[list[int]]:
        """Greedy tokens of each prompt row ((B, T) tensor on the model's device), prompts excluded."""
        for block in self.model.transformer.h:  # type: ignore[union-attr]
            block.attn.kv_cache.reset_parameters()  # as litgpt generate does between samples
        total = prompts.shape[1] + self.new
        if self.compiled is not None:
            self.base.next_token = self.compiled
        try:
            if self.batch == 1:
                out = self.base.generate(self.model, prompts[0], total, temperature=0.0, include_prompt=False)
                return [out.tolist()]
            steps = self.base.batched_generate_fn(self.model, prompts, total, sample_args={"temperature": 0.0},
                                                  include_prompt=False, include_eos=True)
            rows = [list(r) for r in zip(*[[int(t) for t in step] for step in steps], strict=True)]
            return rows
        finally:
            self.base.next_token = self.original

"""LoRA adapters in peft's own format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensors carry peft's names for the Hugging Face model (``base_model.model.transformer.h.0.attn.
c_attn.lora_A.weight``), so `peft.PeftModel.from_pretrained` puts a legolm adapter on the
transformers model and `load_adapter` puts a peft adapter on a legolm model. Layout notes:

* GPT-2's ``Conv1D`` keeps (in, out) weights, but peft's lora_A / lora_B are (r, in) / (out, r)
  there too (``fan_in_fan_out=True`` only transposes the merged delta): no transform.
* GPT-NeoX's fused ``query_key_value`` interleaves q/k/v per head and legolm regroups its rows
  (see `legolm.checkpoints.hf`): lora_B's rows (and a saved qkv bias) get the same permutation.
  The permutation is read off the family rule's transform applied to a 1-D index vector, which
  for every rule is the weight's row permutation (GPT-2's transpose leaves vectors alone).
* A model with no Hugging Face family (mixed layer types) is saved under legolm's own names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from legolm.adapters.base import adapter_layers
from legolm.adapters.inject import (
    LoRAConfig,
    hf_family,
    hf_module_names,
    inject_lora,
    module_aliases,
    modules_to_save,
    unload,
)
from legolm.adapters.lora import LoRALinear
from legolm.checkpoints.hf import GPT2, Family, Rule
from legolm.core.config import ModelConfig
from legolm.errors import CheckpointError, ConfigError, LegolmError
from legolm.model.transformer import TransformerLM
from legolm.utils.io import atomic_dir, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# peft options legolm does not implement; an adapter using them is refused rather than half-loaded.
UNSUPPORTED = {"use_dora": False, "layers_to_transform": None, "exclude_modules": None, "target_parameters": None,
               "lora_bias": False, "layer_replication": None, "trainable_token_indices": None}

Fn = Callable[[Tensor], Tensor]


def _same(t: Tensor) -> Tensor:
    return t


@dataclass
class Entry:
    """One tensor of the adapter file: its peft key, the legolm tensor, and the layout maps."""

    key: str
    tensor: Tensor
    to_hf: Fn = _same
    to_ours: Fn = _same


def _rule_for(name: str, family: Family) -> Rule | None:
    """The family rule of legolm parameter ``name``, preferring the one that keeps legolm's name."""
    rules = [r for r in family.rules if r.match(name, hf_side=False) is not None]
    return sorted(rules, key=lambda r: r.match(name, hf_side=False) != name)[0] if rules else None


def _param_entry(name: str, tensor: Tensor, family: Family | None, config: ModelConfig,
                 hf_module: str | None = None) -> Entry:
    """A model parameter saved whole (bias, modules_to_save), renamed and re-laid-out like a checkpoint."""
    rule = _rule_for(name, family) if family is not None else None
    key = hf_module or (rule.match(name, hf_side=False) if rule is not None else None) or name
    if rule is None:
        return Entry(PREFIX + key, tensor)
    to_hf, to_ours = rule.to_hf, rule.to_ours
    return Entry(PREFIX + key, tensor, (lambda t: to_hf(t, config)) if to_hf else _same,
                 (lambda t: to_ours(t, config)) if to_ours else _same)


def _row_maps(name: str, rows: int, family: Family | None, config: ModelConfig) -> tuple[Fn, Fn]:
    """Output-row permutations (legolm -> HF, HF -> legolm) of module ``name``'s weight."""
    rule = _rule_for(name + ".weight", family) if family is not None else None
    if rule is None or rule.to_hf is None or rule.to_ours is None:
        return _same, _same
    index = torch.arange(rows)
    to_hf, to_ours = rule.to_hf(index, config), rule.to_ours(index, config)
    return (lambda t: t[to_hf.to(t.device)]), (lambda t: t[to_ours.to(t.device)])


def adapter_entries(model: TransformerLM, config: LoRAConfig) -> list[Entry]:
    """Every tensor a peft adapter file holds for ``model``'s adapters and ``config``'s extras."""
    family, mc = hf_family(model.config), model.config
    aliases = module_aliases(model, family)
    layers = adapter_layers(model)
    entries: list[Entry] = []
    for name, layer in layers.items():
        if not isinstance(layer, LoRALinear):
            raise CheckpointError(f"{name} holds a {type(layer).__name__}; the peft format here stores LoRA only")
        hf = _hf_name(name, family)
        to_hf, to_ours = _row_maps(name, layer.out_features, family, mc)
        entries += [Entry(f"{PREFIX}{hf}.lora_A.weight", layer.lora_A),
                    Entry(f"{PREFIX}{hf}.lora_B.weight", layer.lora_B, to_hf, to_ours)]
    bias_owners = {n: m for n, m in model.named_modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    for owner, module in bias_owners.items():
        adapted = owner.removesuffix(".base_layer") if owner.endswith(".base_layer") else None
        if config.bias == "all" or (config.bias == "lora_only" and adapted in layers):
            base = adapted if adapted is not None else owner
            hf_key = f"{_hf_name(base, family)}.base_layer.bias" if adapted else None
            entries.append(_param_entry(f"{base}.bias", module.bias, family, mc, hf_key))
    for name in modules_to_save(config, aliases):
        for pname, p in model.get_submodule(name).named_parameters():
            entries.append(_param_entry(f"{name}.{pname}", p, family, mc))
    return entries


def _hf_name(name: str, family: Family | None) -> str:
    names = hf_module_names(name, family)
    return names[0] if names else name


def peft_config_dict(model: TransformerLM, config: LoRAConfig) -> dict[str, Any]:
    """``adapter_config.json`` naming every adapted module exactly (full names, per-module r/alpha)."""
    family = hf_family(model.config)
    layers = {_hf_name(n, family): m for n, m in adapter_layers(model).items() if isinstance(m, LoRALinear)}
    aliases = module_aliases(model, family)
    saved = [_hf_name(n, family) for n in modules_to_save(config, aliases)]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": model.config.name,
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(layers), "use_rslora": config.use_rslora, "bias": config.bias,
        "rank_pattern": {re.escape(n): m.r for n, m in layers.items() if m.r != config.r},
        "alpha_pattern": {re.escape(n): m.alpha for n, m in layers.items() if m.alpha != config.alpha},
        "modules_to_save": saved or None, "fan_in_fan_out": family is GPT2,
        "init_lora_weights": True, "inference_mode": True, **UNSUPPORTED,
    }


def save_adapter(model: TransformerLM, directory: str | Path, config: LoRAConfig, overwrite: bool = False) -> Path:
    """Write ``model``'s LoRA adapters in peft's format, atomically.

    Args:
        model: A model that went through `inject_lora` (or `load_adapter`).
        directory: Output directory; must not exist unless ``overwrite``.
        config: The config the adapters were injected with (bias and modules_to_save come from it).
    """
    if any(layer.merged for layer in adapter_layers(model).values()):
        raise CheckpointError("the adapters are merged into the base weights; unmerge_adapters() before saving them")
    state = {e.key: e.to_hf(e.tensor.detach()).to("cpu").contiguous() for e in adapter_entries(model, config)}
    with atomic_dir(directory, overwrite) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config_dict(model, config), indent=2) + "\n")
    return Path(directory)


def read_adapter_config(directory: str | Path) -> tuple[LoRAConfig, dict[str, Any]]:
    """The `LoRAConfig` of a peft LoRA adapter directory, and the raw JSON."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {ADAPTER_CONFIG}; expected a peft adapter directory")
    try:
        raw = read_json(path)
    except LegolmError as err:
        raise CheckpointError(str(err)) from None
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{path} is a {raw.get('peft_type')!r} adapter; legolm loads LORA adapters")
    used = [k for k, off in UNSUPPORTED.items() if raw.get(k) not in (off, None, False, [], {})]
    if used:
        raise CheckpointError(f"{path} uses peft option(s) {used} that legolm does not support; merge the "
                              "adapter with peft first")
    targets = raw.get("target_modules") or []
    try:
        config = LoRAConfig(
            r=_int(raw.get("r", 8)), alpha=float(raw.get("lora_alpha", 8)),
            dropout=float(raw.get("lora_dropout", 0.0)),
            target_modules=[] if isinstance(targets, str) else [str(t) for t in targets],
            target_regex=targets if isinstance(targets, str) else None,
            rank_pattern={str(k): _int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
            use_rslora=bool(raw.get("use_rslora", False)), bias=raw.get("bias", "none"),
            modules_to_save=[str(m) for m in raw.get("modules_to_save") or []],
        )
    except (TypeError, ValueError, AttributeError) as err:  # "abc" for r, a string or list where a mapping goes
        raise CheckpointError(f"{path} has an ill-typed value ({err}); fix the adapter config") from None
    return config, raw


def _int(value: Any) -> int:
    """An integer of a JSON config (``8``, not ``8.5``, ``"8"`` or ``true``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def load_adapter(model: TransformerLM, directory: str | Path) -> LoRAConfig:
    """Inject the LoRA adapter saved in ``directory`` (peft format) into ``model`` and load its weights.

    On any mismatch the model is left as it was.

    Returns:
        The adapter's `LoRAConfig`.

    Raises:
        CheckpointError: Not a peft LoRA adapter, made for another architecture, or of other shapes.
    """
    config, raw = read_adapter_config(directory)
    base = raw.get("base_model_name_or_path")
    made_for = f"it was made for {base!r}" if base else "is it an adapter for this model?"
    try:
        inject_lora(model, config)
    except ConfigError as err:
        raise CheckpointError(f"adapter {directory} does not fit this {model.config.name} model ({err}); "
                              f"{made_for}") from None
    try:
        _copy_in(model, config, read_weights_file(Path(directory)), f"{directory}", made_for)
    except CheckpointError:
        unload(model)
        raise
    return config


def read_weights_file(directory: Path) -> dict[str, Tensor]:
    """``adapter_model.safetensors`` (or ``adapter_model.bin``, read with weights_only=True)."""
    if (directory / ADAPTER_WEIGHTS).is_file():
        return read_weights_only(directory / ADAPTER_WEIGHTS)
    if (directory / "adapter_model.bin").is_file():
        return dict(torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True))
    raise CheckpointError(f"{directory} has no {ADAPTER_WEIGHTS}; expected a peft adapter directory")


def read_weights_only(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read {path} ({str(err).splitlines()[0]}); the file is truncated or "
                              "corrupt") from None


@torch.no_grad()
def _copy_in(model: TransformerLM, config: LoRAConfig, state: dict[str, Tensor], where: str, made_for: str) -> None:
    entries = {e.key: e for e in adapter_entries(model, config)}
    # peft with bias="all" also saves the bias copies inside its modules_to_save wrappers.
    state = {k.replace(".modules_to_save.", "."): v for k, v in state.items() if ".original_module." not in k}
    missing = sorted(set(entries) - set(state))
    unexpected = sorted(set(state) - set(entries))
    if missing or unexpected:
        first = (f"lacks {missing[:2]}" if missing else "") + (" and " if missing and unexpected else "") + (
            f"has unexpected {unexpected[:2]}" if unexpected else "")
        raise CheckpointError(f"adapter {where} {first}; {made_for}")
    for key, entry in entries.items():
        shape = entry.to_hf(entry.tensor).shape
        if state[key].shape != shape:
            raise CheckpointError(f"adapter tensor {key} has shape {tuple(state[key].shape)} but this model needs "
                                  f"{tuple(shape)}; {made_for}")
    for key, entry in entries.items():
        entry.tensor.copy_(entry.to_ours(state[key]))

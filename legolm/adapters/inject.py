"""The one way LoRA enters a model: `inject_lora(model, LoRAConfig)`, and the way out (merge / unload).

Targets are written in legolm's module names (``blocks.0.attn.qkv``) or in Hugging Face / peft
vocabulary (``c_attn``, ``c_proj``, ``q_proj``, ``query_key_value``): every module also answers
to its Hugging Face name(s), read off the family's key rules in `legolm.checkpoints.hf`, so a
target matches exactly the modules peft would match on the Hugging Face model. On GPT-2,
``c_proj`` is both ``transformer.h.N.attn.c_proj`` (legolm ``blocks.N.attn.proj``) and
``transformer.h.N.mlp.c_proj`` (``blocks.N.mlp.proj``).

Matching follows peft: an entry of ``target_modules`` matches a name equal to it or ending in
``.entry``; ``target_regex`` must match a whole name; ``all-linear`` takes every linear layer but
the LM head; ``rank_pattern`` / ``alpha_pattern`` keys match a name's end (``(.*\\.)?key$``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from legolm.adapters.base import AdapterLayer, adapter_layers
from legolm.adapters.lora import LoRALinear, check_lora_settings
from legolm.checkpoints.hf import FAMILIES, Family
from legolm.core.config import ModelConfig
from legolm.errors import ConfigError, LegolmError
from legolm.model.transformer import TransformerLM

ALL_LINEAR = "all-linear"
LM_HEAD = "lm_head"
Bias = Literal["none", "lora_only", "all"]


@dataclass
class LoRAConfig:
    """Where LoRA goes and how big it is (field names follow peft's ``LoraConfig``).

    Attributes:
        r: Rank of every adapter (unless rank_pattern says otherwise).
        alpha: Scale numerator: updates are multiplied by alpha/r (alpha/sqrt(r) with use_rslora).
        dropout: Dropout probability on the adapters' input, in [0, 1).
        target_modules: Modules to adapt: names or suffixes, legolm or Hugging Face (c_attn, q_proj), or all-linear.
        target_regex: Regex a whole module name (legolm or Hugging Face) must match; adds to target_modules.
        rank_pattern: Per-module rank, {name-suffix regex: r}, e.g. {"c_attn": 16}.
        alpha_pattern: Per-module alpha, {name-suffix regex: alpha}.
        use_rslora: Rank-stabilised scaling alpha/sqrt(r) (Kalajdzievski 2023).
        bias: Which biases train: none, lora_only (those of adapted layers) or all.
        modules_to_save: Modules trained in full and saved with the adapter (exact names or suffixes).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    target_regex: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    bias: Bias = "none"
    modules_to_save: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Raise `ConfigError` for a setting LoRA cannot use."""
        check_lora_settings(self.r, self.alpha, self.dropout)
        for key, r in self.rank_pattern.items():
            check_lora_settings(r, self.alpha, self.dropout, where=f"LoRA rank_pattern[{key!r}]")
        for key, alpha in self.alpha_pattern.items():
            check_lora_settings(self.r, alpha, self.dropout, where=f"LoRA alpha_pattern[{key!r}]")
        if self.bias not in ("none", "lora_only", "all"):
            raise ConfigError(f"LoRA bias must be none, lora_only or all, got {self.bias!r}")
        if not self.target_modules and not self.target_regex:
            raise ConfigError("LoRA has no targets; give target_modules (e.g. c_attn,c_proj or all-linear) "
                              "or a target_regex")
        for pattern in [self.target_regex or "", *self.rank_pattern, *self.alpha_pattern]:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"LoRA pattern {pattern!r} is not a valid regular expression ({err})") from None


# -- names ---------------------------------------------------------------------------------------
def hf_family(config: ModelConfig) -> Family | None:
    """The Hugging Face family whose layer type every block has, or None for mixed stacks."""
    kinds = set(config.layers)
    return next((f for f in FAMILIES.values() if kinds == {f.layer}), None)


def hf_module_names(name: str, family: Family | None) -> list[str]:
    """Hugging Face name(s) of legolm module ``name`` (the module owning ``name.weight``).

    A name may have two (GPT-NeoX's head is ``embed_out`` in transformers 4, ``lm_head`` in 5): the
    one equal to legolm's own name comes first.
    """
    if family is None:
        return []
    names = [other.removesuffix(".weight") for rule in family.rules
             if (other := rule.match(name + ".weight", hf_side=False)) is not None]
    return sorted(dict.fromkeys(names), key=lambda n: n != name)


def module_aliases(model: nn.Module, family: Family | None) -> dict[str, list[str]]:
    """Every module with its own weight (outside adapters): legolm name first, then Hugging Face names."""
    inside = {f"{n}.base_layer" for n in adapter_layers(model)}
    return {name: [name, *hf_module_names(name, family)] for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), nn.Parameter) and name not in inside}


def _suffix_match(target: str, aliases: Iterable[str]) -> bool:
    return any(a == target or a.endswith("." + target) for a in aliases)


def pattern_value(patterns: dict[str, float], aliases: list[str], default: float) -> float:
    """peft's ``get_pattern_key``: the first key matching the end of any alias, else ``default``."""
    for key, value in patterns.items():
        if any(re.match(rf"(.*\.)?({key})$", a) for a in aliases):
            return value
    return default


def _no_match_error(what: str, target: str, aliases: dict[str, list[str]]) -> ConfigError:
    names = {n for al in aliases.values() for a in al for n in (a, a.rsplit(".", 1)[-1])}
    close = difflib.get_close_matches(target, sorted(names), n=5, cutoff=0.5)
    hint = f"closest module names: {', '.join(close)}" if close else f"module names look like {sorted(aliases)[-1]}"
    return ConfigError(f"{what} {target!r} matches no linear layer of this model; {hint}")


def resolve_targets(config: LoRAConfig, aliases: dict[str, list[str]], linear: set[str]) -> list[str]:
    """legolm names of the linear layers ``config`` targets; every target must match at least one."""
    chosen: set[str] = set()
    for target in config.target_modules:
        if target == ALL_LINEAR:
            hits = {n for n in linear if n != LM_HEAD}
        else:
            hits = {n for n in linear if _suffix_match(target, aliases[n])}
        if not hits:
            raise _no_match_error("LoRA target", target, {n: aliases[n] for n in linear})
        chosen |= hits
    if config.target_regex:
        hits = {n for n in linear if any(re.fullmatch(config.target_regex, a) for a in aliases[n])}
        if not hits:
            raise _no_match_error("LoRA target_regex", config.target_regex, {n: aliases[n] for n in linear})
        chosen |= hits
    order = list(aliases)
    return sorted(chosen, key=order.index)


# -- injection -----------------------------------------------------------------------------------
def inject_lora(model: TransformerLM, config: LoRAConfig) -> list[str]:
    """Wrap every targeted `nn.Linear` of ``model`` in a `LoRALinear`, in place, and freeze the rest.

    Afterwards exactly these parameters train: the adapters', the biases ``config.bias`` names, and
    those of ``config.modules_to_save``.

    Returns:
        The legolm names of the adapted modules, in model order.

    Raises:
        ConfigError: A bad rank/alpha/dropout, or a target that matches nothing (with the closest names).
        LegolmError: The model already holds adapters.
    """
    config.validate()
    if adapter_layers(model):
        raise LegolmError("the model already holds adapters; merge_and_unload() it before injecting new ones")
    aliases = module_aliases(model, hf_family(model.config))
    linear = {n for n in aliases if isinstance(model.get_submodule(n), nn.Linear)}
    names = resolve_targets(config, aliases, linear)
    for name in names:
        r = int(pattern_value(dict(config.rank_pattern), aliases[name], config.r))
        alpha = pattern_value(config.alpha_pattern, aliases[name], config.alpha)
        base = model.get_submodule(name)
        assert isinstance(base, nn.Linear)
        side = min(base.in_features, base.out_features)
        if r > side:  # a larger rank adds nothing (and a huge one would allocate without end)
            raise ConfigError(f"LoRA rank {r} for {aliases[name]} exceeds its smaller side {side} "
                              f"({base.in_features} -> {base.out_features}); use r <= {side}")
        layer = LoRALinear(base, r, alpha, config.dropout, config.use_rslora)
        _replace(model, name, layer.train(base.training))  # new modules would otherwise be in training mode
    mark_trainable(model, config, aliases)
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def modules_to_save(config: LoRAConfig, aliases: dict[str, list[str]]) -> list[str]:
    """legolm names of the modules ``config.modules_to_save`` names (each entry must match)."""
    chosen: list[str] = []
    for target in config.modules_to_save:
        hits = [n for n, al in aliases.items() if _suffix_match(target, al)]
        if not hits:
            raise _no_match_error("modules_to_save entry", target, aliases)
        chosen += [h for h in hits if h not in chosen]
    return chosen


def mark_trainable(model: TransformerLM, config: LoRAConfig, aliases: dict[str, list[str]]) -> None:
    """Freeze everything, then unfreeze adapters, the chosen biases and ``modules_to_save``."""
    model.requires_grad_(False)
    layers = adapter_layers(model)
    for layer in layers.values():
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    if config.bias == "all":
        biased: Iterable[nn.Module] = model.modules()
    else:
        biased = [layer.base_layer for layer in layers.values()] if config.bias == "lora_only" else []
    for m in biased:
        if isinstance(getattr(m, "bias", None), nn.Parameter):
            m.bias.requires_grad_(True)
    for name in modules_to_save(config, aliases):
        if name in layers:
            raise ConfigError(f"{name} is both a LoRA target and in modules_to_save; choose one")
        model.get_submodule(name).requires_grad_(True)


# -- merging -------------------------------------------------------------------------------------
def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (forward then runs the base layers alone)."""
    _check_mergeable(model)
    for layer in adapter_layers(model).values():
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    """Take every merged adapter back out of its base weight."""
    for layer in adapter_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: TransformerLM) -> TransformerLM:
    """Merge every adapter and put the plain base layers back: a plain `TransformerLM`, all trainable.

    The same model object is returned, now holding no adapter modules, ready for
    `legolm.save_checkpoint` or `legolm.export_hf`.
    """
    merge_adapters(model)
    return unload(model)


def unload(model: TransformerLM) -> TransformerLM:
    """Remove every adapter (merged ones stay in the weights, unmerged ones are dropped)."""
    for name, layer in adapter_layers(model).items():
        _replace(model, name, layer.base_layer)
    return model.requires_grad_(True)


def _check_mergeable(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if getattr(config, "tie_embeddings", False) and isinstance(getattr(model, LM_HEAD, None), AdapterLayer):
        raise LegolmError("cannot merge a LoRA on the LM head of a model with tied embeddings (it would change "
                          "the input embedding too); keep the adapter unmerged or untie the embeddings")

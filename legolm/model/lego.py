"""`LegoLM`: a `TransformerLM` (the deep model) with a second, shallow exit after layer ``split``.

LEGO (Layered Ensemble with Gradual Optimization) trains a shallow model first (phase 1), then
adds upper layers that train only on the tokens the shallow model is unsure of (phase 2). The
shallow exit stays frozen, so the confidence threshold calibrated on it stays valid. The idea of
exiting early on confident tokens follows CALM (Schuster et al. 2022, "Confident Adaptive
Language Modeling", arXiv 2207.07061); the same exit serves as the drafter of self-speculative
decoding (LayerSkip, Elhoushi et al. 2024, arXiv 2404.16710), unless phase 3 gave the model a separate
draft exit (`LegoLM.draft_exit`, at the same split) to draft with instead.

::

                                       shallow exit (frozen after phase 1)
                                     ┌─ shallow_exit.norm ─ shallow_exit.head ─ logits_s ─ conf = max softmax
    idx ─ wte ─ blocks[0:split] ─ h_s┤                                                     │
        (frozen)  (frozen lower)     │                                                     w = σ((conf - τ) / T)
                                     └─ blocks[split:L] ─ norm ─ lm_head ─ logits_d
                                        (trainable upper)  deep exit = the model's own

    routed:  p = w · p_s + (1 - w) · p_d       (continuous w in training and evaluation)
    generate: the shallow token if conf >= τ, else run the upper layers and take the deep token

A `LegoLM` *is* its deep model: ``forward`` is `TransformerLM.forward` over all layers, so every
tool that takes a `TransformerLM` (``fit``, ``generate``, ``eval ppl``, ``export``) works on it, and
`LegoLM.forward_exits` gives both exits. Two ways in:

* grown (the seed): a shallow `TransformerLM` trains alone (``split == n_layer``: its own norm/head
  are the shallow exit), then `extend` appends fresh upper layers and moves that exit aside;
* from a pretrained model (`LegoLM.from_pretrained_split`): the first ``split`` blocks of a real
  model get a new exit (a copy of its final norm and head, trained in phase 1), the upper blocks are
  the model's own.

Routing weights: w = sigmoid((conf - τ) / T) is 1/2 exactly at the calibrated threshold, monotone
in the shallow confidence, differentiable, and tends to the generation rule (w = 1 iff conf >= τ)
as T -> 0; the routed distribution is the mixture w · p_s + (1 - w) · p_d, so its perplexity is a
proper likelihood. The same function weighs the phase-2 loss and every reported routed perplexity.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from legolm.core.config import ModelConfig
from legolm.core.kv_cache import KVCache
from legolm.errors import ConfigError
from legolm.layers import build_layer
from legolm.layers.norms import make_norm
from legolm.model.transformer import TransformerLM, init_weights

CONFIDENCE_QUANTILES = 101  # stored quantiles of the validation confidence (0%, 1%, ..., 100%)
ExitName = Literal["shallow_exit", "draft_exit"]  # a `LegoLM`'s extra exits, by attribute name


# -- routing ---------------------------------------------------------------------------------------
def confidence(logits: Tensor) -> Tensor:
    """Max softmax probability, in fp32: (..., V) -> (...)."""
    logits = logits.float()
    return (logits.amax(-1) - logits.logsumexp(-1)).exp()


def exits(conf: Tensor, threshold: float | Tensor) -> Tensor:
    """The generation rule: exit (keep the shallow token) where ``conf >= threshold`` (a number, or a device
    scalar as the fused decoder's captured start reads it).

    ``threshold == 1`` means never exit: a saturated softmax can reach exactly 1.0 in floating
    point, and "never" must stay exact. ``threshold == 0`` exits always.
    """
    return (conf >= threshold) & (threshold < 1.0)


def routing_log_weights(conf: Tensor, threshold: float, temperature: float) -> tuple[Tensor, Tensor]:
    """(log w, log(1 - w)) with w = sigmoid((conf - threshold) / temperature), the shallow exit's weight.

    The continuous weight is what training and evaluation both use; as ``temperature -> 0`` it
    tends to the hard rule of `exits`, which generation uses.
    """
    z = (conf.float() - threshold) / temperature
    return F.logsigmoid(z), F.logsigmoid(-z)


def routed_log_probs(logp_s: Tensor, logp_d: Tensor, conf: Tensor, threshold: float, temperature: float) -> Tensor:
    """log(w · p_s + (1 - w) · p_d) from log-probabilities of any matching shapes (conf broadcast)."""
    log_w, log_1mw = routing_log_weights(conf, threshold, temperature)
    if logp_s.dim() > conf.dim():  # full distributions (..., V)
        log_w, log_1mw = log_w[..., None], log_1mw[..., None]
    return torch.logaddexp(log_w + logp_s.float(), log_1mw + logp_d.float())


def zero_residual_outputs(block: nn.Module) -> None:
    """Zero the linear layers whose outputs are added to the residual stream (``proj``, ``down``): the block
    becomes the identity. Their inputs are not zero, so they get gradients at once."""
    with torch.no_grad():
        for name, sub in block.named_modules():
            if isinstance(sub, nn.Linear) and name.rsplit(".", 1)[-1] in ("proj", "down"):
                sub.weight.zero_()
                if sub.bias is not None:
                    sub.bias.zero_()


def check_threshold(threshold: float) -> None:
    """Raise `ConfigError` unless ``threshold`` is a probability in [0, 1]."""
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0) or math.isnan(threshold):
        raise ConfigError(f"routing threshold must be in [0, 1] (a max softmax probability), got {threshold}")


def check_target_ratio(target_ratio: float) -> None:
    """Raise `ConfigError` unless 0 < target_ratio < 1."""
    if not (isinstance(target_ratio, (int, float)) and 0.0 < target_ratio < 1.0):
        raise ConfigError(f"target_ratio must be in (0, 1) (the fraction of validation tokens made hard), "
                          f"got {target_ratio}; e.g. 0.5 makes the least confident half hard")


def quantile_threshold(conf: Tensor, target_ratio: float) -> float:
    """The value with ``floor(target_ratio · N)`` of the N confidences strictly below it (ties aside)."""
    check_target_ratio(target_ratio)
    ordered = conf.flatten().sort().values
    k = min(int(target_ratio * ordered.numel()), ordered.numel() - 1)
    return float(ordered[k])


# -- model -----------------------------------------------------------------------------------------
class ExitHead(nn.Module):
    """One exit: (optional lens) -> norm -> LM head, (B, T, C) -> (B, T, vocab).

    The lens is an affine map of the hidden states into the basis the norm and head expect (the
    "tuned lens" of Belrose et al. 2023, arXiv 2303.08112): a pretrained model's intermediate states
    differ from its last ones (outlier dimensions, other scales), so its own final norm and head read
    them badly (SmolLM2-135M after 12 of 30 blocks: perplexity in the millions). Initialised to the
    identity, it is what phase 1 trains for a pretrained split, with the model's head shared and frozen.
    """

    def __init__(self, norm: nn.Module, head: nn.Linear, lens: nn.Linear | None = None) -> None:
        super().__init__()
        self.norm, self.head, self.lens = norm, head, lens

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.norm(self.lens(h) if self.lens is not None else h))

    @classmethod
    def tuned_lens(cls, norm: nn.Module, head: nn.Linear) -> ExitHead:
        """An exit reading through a new identity lens, a copy of ``norm`` and ``head`` itself (shared)."""
        w = head.weight
        lens = nn.Linear(head.in_features, head.in_features, bias=True, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lens.weight.copy_(torch.eye(head.in_features, device=w.device, dtype=w.dtype))
            lens.bias.zero_()
        return cls(copy.deepcopy(norm), head, lens)

    def trainable(self) -> None:
        """Phase 1 of a pretrained split: the lens and the norm train, a shared head does not."""
        self.requires_grad_(True)
        if self.lens is not None:
            self.head.requires_grad_(False)

    @classmethod
    def copy_of(cls, norm: nn.Module, head: nn.Linear) -> ExitHead:
        """An exit whose norm and head start as copies of ``norm`` and ``head`` (own storage)."""
        new_head = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None,
                             device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            new_head.weight.copy_(head.weight)
            if head.bias is not None and new_head.bias is not None:
                new_head.bias.copy_(head.bias)
        return cls(copy.deepcopy(norm), new_head)


@dataclass
class LegoMeta:
    """What a LEGO checkpoint stores besides the weights.

    Attributes:
        split: Lower layers (the shallow model's depth).
        trained: Phase 1 has trained the shallow model / exit (`extend` refuses an untrained one).
        routing_threshold: Calibrated shallow confidence threshold τ (None before calibration).
        routing_temperature: T of the continuous routing weight sigmoid((conf - τ) / T).
        target_ratio: Fraction of validation tokens below τ when it was calibrated.
        confidence_quantiles: Quantiles 0%, 1%, ..., 100% of the validation tokens' shallow confidence
            (what `threshold_for_ratio` turns a target ratio into τ with, at generation time).
        exit_lens: The shallow exit reads through a tuned lens (a pretrained split's exit).
        draft_exit: The model has a separate draft exit at the split (phase 3 with ``lego.distill_into:
            draft``), shaped like the shallow exit (a lens where it has one).
        kv_mode: The threshold decoder's upper-cache mode that `legolm lego` measured best at τ (fill or skip;
            `legolm.lego.report.choose_kv_mode`): generation's default for this model (None: not measured).
    """

    split: int
    trained: bool = False
    routing_threshold: float | None = None
    routing_temperature: float = 0.05
    target_ratio: float | None = None
    confidence_quantiles: list[float] = field(default_factory=list)
    exit_lens: bool = False
    draft_exit: bool = False
    kv_mode: Literal["fill", "skip"] | None = None


@dataclass
class LegoOutput:
    """Logits of both exits (deep is None before `extend`) and the shallow confidence (B, T)."""

    shallow_logits: Tensor
    deep_logits: Tensor | None
    conf: Tensor


class LegoLM(TransformerLM):
    """A `TransformerLM` (all layers; its norm/head are the deep exit) with a shallow exit after ``split``.

    Args:
        config: All layers (before `extend`, only the shallow model's).
        meta: Split, phase-1 flag and routing settings (default: the shallow model alone).
        shallow_exit: The shallow exit when ``meta.split < n_layer`` (None before `extend`).

    A separate draft exit (``draft_exit``, made by `add_draft_exit`) drafts for self-speculative
    decoding instead of the shallow exit, which then serves threshold early exit alone; draft heads
    apart from the model's own exits as in Medusa (Cai et al. 2024, arXiv 2401.10774) and EAGLE (Li
    et al. 2024, arXiv 2401.15077).
    """

    def __init__(self, config: ModelConfig, meta: LegoMeta | None = None,
                 shallow_exit: ExitHead | None = None) -> None:
        super().__init__(config)
        self.meta = meta or LegoMeta(split=config.n_layer)
        if shallow_exit is None and self.meta.split < config.n_layer:  # filled by a checkpoint's weights
            shallow_exit = self._empty_exit()
        self.shallow_exit = shallow_exit
        self.draft_exit: ExitHead | None = self._empty_exit() if self.meta.draft_exit else None
        self._check_split()

    def _empty_exit(self) -> ExitHead:
        """An exit shaped as the meta says (a lens with ``exit_lens``), its weights to be loaded."""
        C = self.config.n_embd
        lens = nn.Linear(C, C, bias=True) if self.meta.exit_lens else None
        return ExitHead(make_norm(self.config), nn.Linear(C, self.config.vocab_size, bias=False), lens)

    def _check_split(self) -> None:
        if not 1 <= self.meta.split <= self.n_layer:
            raise ConfigError(f"LEGO split {self.meta.split} must be in [1, {self.n_layer}]")
        if self.meta.split == self.n_layer and self.shallow_exit is not None:
            raise ConfigError(f"a LEGO model split at its top layer {self.n_layer} has no separate shallow exit")
        if self.draft_exit is not None and self.shallow_exit is None:
            raise ConfigError("a LEGO draft exit sits beside the shallow exit; this model has none")

    @classmethod
    def adopt(cls, model: TransformerLM, meta: LegoMeta | None = None,
              shallow_exit: ExitHead | None = None) -> LegoLM:
        """A `LegoLM` over the modules of ``model`` (shared, not copied)."""
        with torch.device("meta"):
            lego = cls(model.config, LegoMeta(split=model.config.n_layer))
        lego.wte, lego.wpe, lego.blocks, lego.norm, lego.lm_head = (model.wte, model.wpe, model.blocks, model.norm,
                                                                    model.lm_head)
        lego.rope = model.rope
        lego.meta, lego.shallow_exit = meta or LegoMeta(split=model.config.n_layer), shallow_exit
        lego.meta.draft_exit, lego.draft_exit = False, None
        lego._check_split()
        return lego.train(model.training)

    @classmethod
    def from_pretrained_split(cls, model: TransformerLM, split: int) -> LegoLM:
        """A pretrained model split after block ``split``: a new shallow exit, the upper blocks its own.

        The exit is a tuned lens (`ExitHead.tuned_lens`) into a copy of the model's final norm and its
        own head; phase 1 trains the lens and the norm (`LegoLM.freeze_for_exit_training`), the model
        itself is not changed.
        """
        if not 1 <= split < model.config.n_layer:
            raise ConfigError(f"lego.split={split} must be in [1, {model.config.n_layer - 1}]: the shallow exit "
                              f"sits after one of the first {model.config.n_layer - 1} blocks")
        return cls.adopt(model, LegoMeta(split=split, exit_lens=True), ExitHead.tuned_lens(model.norm, model.lm_head))

    # -- properties ----------------------------------------------------------------------------
    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    @property
    def split(self) -> int:
        return self.meta.split

    @property
    def extended(self) -> bool:
        """Both exits exist (the shallow one after ``split``, the deep one on top)."""
        return self.shallow_exit is not None

    @property
    def drafter(self) -> ExitHead | None:
        """The exit self-speculative decoding drafts with: the draft exit if there is one, else the shallow exit."""
        return self.draft_exit if self.draft_exit is not None else self.shallow_exit

    def exit_head(self, name: ExitName) -> ExitHead:
        """The shallow or the draft exit by name (`ConfigError` where the model has none)."""
        head = self.shallow_exit if name == "shallow_exit" else self.draft_exit
        if head is None:
            raise ConfigError(f"this LEGO model has no {name.replace('_', ' ')}"
                              + ("; extend() it first" if name == "shallow_exit" else "; phase 3 with "
                                 "lego.distill_into: draft makes one"))
        return head

    @property
    def threshold(self) -> float:
        if self.meta.routing_threshold is None:
            raise ConfigError("this LEGO model has no routing threshold yet; calibrate one with "
                              "compute_confidence_threshold and pass it to extend()")
        return self.meta.routing_threshold

    def threshold_for_ratio(self, target_ratio: float) -> float:
        """τ under which ``target_ratio`` of the calibration tokens' confidences fell (stored quantiles)."""
        check_target_ratio(target_ratio)
        q = self.meta.confidence_quantiles
        if len(q) < 2:
            raise ConfigError("this LEGO model stores no confidence quantiles (calibrated before they were "
                              "kept); give a threshold instead of a target ratio")
        x = target_ratio * (len(q) - 1)  # linear interpolation between the stored quantiles
        lo = int(x)
        return q[lo] + (x - lo) * (q[min(lo + 1, len(q) - 1)] - q[lo])

    # -- forward -------------------------------------------------------------------------------
    def lower(self, idx: Tensor, *, cache: KVCache | None = None, input_pos: Tensor | None = None,
              positions: Tensor | None = None) -> Tensor:
        """Embeddings and the lower layers: (B, T) ids -> (B, T, C) hidden states h_s.

        (Not ``self(idx, end=split)``: before `extend`, split is the top and that would project.)
        """
        B, T = idx.shape
        if positions is None:
            positions = (input_pos if input_pos is not None else torch.arange(T, device=idx.device)).expand(B, T)
        h = self.embed(idx, positions)  # (B, T, C)
        ctx = self.make_context(positions, h.dtype, cache, input_pos)
        return self.forward_layers(h, ctx, 0, self.split, cache).hidden

    def both_parts(self, idx: Tensor, *, cache: KVCache, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Lower and upper layers over ``idx`` (B, T) into one ``cache`` with one context (RoPE tables and mask
        built once, as a prefill wants): h_s and the top layer's states before the deep exit, (B, T, C) each."""
        positions = input_pos.expand(idx.shape[0], -1)
        h = self.embed(idx, positions)  # (B, T, C)
        ctx = self.make_context(positions, h.dtype, cache, input_pos)
        h_s = self.forward_layers(h, ctx, 0, self.split, cache).hidden
        return h_s, self.forward_layers(h_s, ctx, self.split, None, cache).hidden

    def shallow_head(self, h_s: Tensor) -> Tensor:
        """The shallow exit on lower-layer states: (B, T, C) -> (B, T, V)."""
        return self.shallow_exit(h_s) if self.shallow_exit is not None else self.project(h_s)

    def draft_logits(self, h_s: Tensor) -> Tensor:
        """The drafter (`drafter`) on lower-layer states: (B, T, C) -> (B, T, V); threshold exits never use it."""
        drafter = self.drafter
        return drafter(h_s) if drafter is not None else self.project(h_s)

    def upper_hidden(self, h: Tensor, *, cache: KVCache | None = None, input_pos: Tensor | None = None,
                     positions: Tensor | None = None) -> Tensor:
        """The upper layers without the exit: (B, T, C) -> (B, T, C) (causal; a cache as in `forward`)."""
        B, T = h.shape[0], h.shape[1]
        if positions is None:
            positions = (input_pos if input_pos is not None else torch.arange(T, device=h.device)).expand(B, T)
        ctx = self.make_context(positions, h.dtype, cache, input_pos)
        return self.forward_layers(h, ctx, self.split, None, cache).hidden

    def forward_upper_layers(self, h: Tensor, *, cache: KVCache | None = None, input_pos: Tensor | None = None,
                             positions: Tensor | None = None) -> Tensor:
        """The upper layers and the deep exit (the LEGO specification's name): (B, T, C) -> (B, T, V)."""
        return self.project(self.upper_hidden(h, cache=cache, input_pos=input_pos, positions=positions))

    def upper_last_logits(self, h: Tensor, *, cache: KVCache | None = None, input_pos: Tensor | None = None,
                          positions: Tensor | None = None) -> Tensor:
        """Upper layers over ``h`` (B, T, C), writing their K/V to ``cache``; deep logits of the last token (B, V).

        A fill-mode call catching up k queued tokens does not project them through the head.
        """
        top = self.upper_hidden(h, cache=cache, input_pos=input_pos, positions=positions)  # (B, T, C)
        return self.project(top[:, -1])

    def forward_exits(self, idx: Tensor) -> LegoOutput:
        """Both exits over whole sequences: (B, T) -> logits (B, T, V) and confidence (B, T)."""
        h_s = self.lower(idx)  # (B, T, C)
        shallow = self.shallow_head(h_s)
        deep = self.forward_upper_layers(h_s) if self.extended else None
        return LegoOutput(shallow, deep, confidence(shallow))

    def routed_log_probs(self, out: LegoOutput, threshold: float | None = None,
                         temperature: float | None = None) -> Tensor:
        """log p of the routed mixture (B, T, V), with the model's τ and T unless given."""
        if out.deep_logits is None:
            raise ConfigError("routing needs the deep exit; extend() the model first")
        thr = self.threshold if threshold is None else threshold
        temp = self.meta.routing_temperature if temperature is None else temperature
        return routed_log_probs(out.shallow_logits.log_softmax(-1), out.deep_logits.log_softmax(-1), out.conf,
                                thr, temp)

    # -- phases --------------------------------------------------------------------------------
    def mark_trained(self) -> None:
        """Record that phase 1 trained the shallow model or exit (saved with the checkpoint)."""
        self.meta.trained = True

    def calibrate(self, threshold: float, target_ratio: float | None, conf: Tensor | None = None) -> None:
        """Record τ (and the ratio it was calibrated at, and the quantiles of ``conf``, the calibration confidences)."""
        check_threshold(threshold)
        self.meta.routing_threshold, self.meta.target_ratio = threshold, target_ratio
        if conf is not None and conf.numel():
            grid = torch.linspace(0, 1, CONFIDENCE_QUANTILES, dtype=torch.float64)
            self.meta.confidence_quantiles = [float(v) for v in torch.quantile(conf.double().flatten(), grid)]

    def extend(self, num_layers: int, routing_threshold: float, freeze_lower: bool = True,
               layer_type: str | None = None, identity_init: bool = True, train_deep_head: bool = False) -> LegoLM:
        """Add upper layers on top of the trained shallow model, in place.

        The shallow model's norm/head move to the frozen shallow exit; the deep exit (the model's own
        norm/head) starts as a copy of them and trains (untied from the embeddings). The new layers
        are initialised as in `TransformerLM`; with ``identity_init`` their residual output projections
        start at zero, so each new block is the identity and the deep exit starts *equal* to the
        shallow one (function-preserving growth, as in Net2Net, Chen et al. 2016, arXiv 1511.05641):
        phase 2 can only move it from there, and keeps it there if training does not help.

        Args:
            num_layers: Total depth after extension (> the current depth).
            routing_threshold: Calibrated confidence threshold τ in [0, 1].
            freeze_lower: Freeze embeddings and lower layers (phase 2 needs it: it trains on their
                stored outputs).
            layer_type: Registered type of the new layers (default: that of the top layer).
            identity_init: Zero the new blocks' residual output projections (see above).
            train_deep_head: Phase 2 also trains the deep head (see `freeze`).

        Raises:
            ConfigError: Not trained yet, already extended, too few layers or τ outside [0, 1].
        """
        check_threshold(routing_threshold)
        if not self.meta.trained:
            raise ConfigError("extend() needs a trained shallow model: run phase 1 first (or load a trained LEGO "
                              "checkpoint), then calibrate the threshold")
        if self.extended:
            raise ConfigError(f"this model is already extended to {self.n_layer} layers; extend a shallow model")
        if num_layers <= self.n_layer:
            raise ConfigError(f"extend(num_layers={num_layers}) must add layers to the current {self.n_layer}; "
                              f"give num_layers > {self.n_layer}")
        old = self.config
        kind = layer_type or old.layers[-1]
        cfg = ModelConfig.from_dict({**old.to_dict(), "tie_embeddings": False,
                                     "layers": [*old.layers, *[kind] * (num_layers - old.n_layer)]})
        p = self.wte.weight
        new_blocks = [build_layer(kind, cfg, i).to(device=p.device, dtype=p.dtype)
                      for i in range(old.n_layer, num_layers)]
        for block in new_blocks:
            init_weights(block, num_layers)
            if identity_init:
                zero_residual_outputs(block)
        self.shallow_exit = ExitHead.copy_of(self.norm, self.lm_head)
        if self.lm_head.weight is self.wte.weight:  # the deep head trains: it gets its own copy
            self.lm_head.weight = nn.Parameter(self.wte.weight.detach().clone())
        self.blocks.extend(new_blocks)
        self.config = cfg
        self.meta.split = old.n_layer
        self.meta.routing_threshold = routing_threshold
        self.freeze(freeze_lower, train_deep_head)
        return self

    def lower_modules(self) -> list[nn.Module]:
        """Embeddings and the blocks below the split."""
        return [self.wte, *([self.wpe] if self.wpe is not None else []), *self.blocks[: self.split]]

    def freeze(self, freeze_lower: bool = True, train_deep_head: bool = False) -> None:
        """Shallow exit frozen always; embeddings and lower layers with ``freeze_lower``; the deep head with
        ``train_deep_head`` off; the rest (upper blocks, final norm) trains.

        The deep head starts as a calibrated head (the shallow one's copy, or a pretrained model's own):
        at the learning rates new blocks want, Adam's per-weight steps move it far from that in a few
        hundred steps (measured on the grown Gutenberg model: held-out hard-token perplexity 209 -> 223
        after 100 steps). A deep head tied to the embeddings is frozen with them in any case.
        """
        for p in self.parameters():
            p.requires_grad_(True)
        for module in self.lower_modules() if freeze_lower else []:
            module.requires_grad_(False)
        if not train_deep_head:
            self.lm_head.requires_grad_(False)
        for head in (self.shallow_exit, self.draft_exit):
            if head is not None:
                head.requires_grad_(False)

    def freeze_for_exit_training(self) -> None:
        """Phase 1 of a pretrained split: only the shallow exit trains, the model stays as it is."""
        if self.shallow_exit is None:
            raise ConfigError("exit training needs a separate shallow exit (LegoLM.from_pretrained_split)")
        self.requires_grad_(False)
        self.shallow_exit.trainable()

    def exit_own_parameters(self, name: ExitName = "shallow_exit") -> dict[str, nn.Parameter]:
        """The parameters of exit ``name`` that nothing else in the model shares, by name.

        A pretrained split's exit reads through the model's own (shared, frozen) head: only its lens and
        norm are its own; a grown model's exit owns its norm and head (copies made by `extend`). A draft
        exit owns what its shallow exit owns (`add_draft_exit`).
        """
        head = self.exit_head(name)
        outside = {id(p) for n, p in self.named_parameters(remove_duplicate=False) if not n.startswith(f"{name}.")}
        return {f"{name}.{n}": p for n, p in head.named_parameters() if id(p) not in outside}

    def freeze_for_distillation(self, name: ExitName = "shallow_exit") -> None:
        """Phase 3 (exit distillation): only the own parameters of exit ``name`` train, all else is frozen."""
        own = self.exit_own_parameters(name)
        self.requires_grad_(False)
        for p in own.values():
            p.requires_grad_(True)

    def add_draft_exit(self) -> ExitHead:
        """A new draft exit (replacing any), starting as a copy of the shallow exit's own parameters.

        Its lens and norm, and a head the shallow exit owns, are copies; a head the shallow exit shares
        with the deep model (a pretrained split) stays shared, and frozen by `freeze_for_distillation`.
        """
        src = self.exit_head("shallow_exit")
        self.draft_exit = None  # a previous draft exit's parameters must not count as "outside" below
        own = {id(p) for p in self.exit_own_parameters().values()}
        head = copy.deepcopy(src.head) if id(src.head.weight) in own else src.head
        self.draft_exit = ExitHead(copy.deepcopy(src.norm), head, copy.deepcopy(src.lens))
        self.meta.draft_exit = True
        return self.draft_exit

    def shallow_model(self) -> TransformerLM:
        """The shallow model alone as a `TransformerLM` (layers 0..split-1 and the shallow exit, shared weights).

        Refused for an exit with a lens (a `TransformerLM` has no place for it).
        """
        if self.shallow_exit is None:
            return self
        if self.shallow_exit.lens is not None:
            raise ConfigError("this shallow exit reads through a tuned lens; use LegoLM.forward_exits or "
                              "generate(..., early_exit=...) instead of a stand-alone shallow model")
        c = self.config
        cfg = ModelConfig.from_dict({**c.to_dict(), "layers": c.layers[: self.split], "tie_embeddings": False})
        with torch.device("meta"):
            model = TransformerLM(cfg)
        model.wte, model.wpe = self.wte, self.wpe
        model.blocks = nn.ModuleList(self.blocks[: self.split])
        model.norm, model.lm_head = self.shallow_exit.norm, self.shallow_exit.head
        model.rope = self.rope
        return model.train(self.training)

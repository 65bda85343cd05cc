"""`LegoLM`: a shallow language model deepened only where it is unsure, with two exits.

LEGO (Layered Ensemble with Gradual Optimization) trains a shallow model first (phase 1), then
adds upper layers that train only on the tokens the shallow model is unsure of (phase 2). The
shallow exit stays frozen, so the confidence threshold calibrated on it stays valid; the deep
exit starts as a copy of it. The idea of exiting early on confident tokens follows CALM
(Schuster et al. 2022, "Confident Adaptive Language Modeling", arXiv 2207.07061).

::

                                          shallow exit (frozen after extend)
                                        ┌─ shallow_exit.norm ─ shallow_exit.head ─ logits_s ─ conf = max softmax
    idx ─ base.wte ─ base.blocks[0:split] ┤                                                     │
          (frozen)     (frozen lower)     h_s                                                  w = σ((conf - τ) / T)
                                        └─ base.blocks[split:L] ─ base.norm ─ base.lm_head ─ logits_d
                                             (trainable upper)      deep exit (own copy)

    routed:  p = w · p_s + (1 - w) · p_d       (continuous w in training and evaluation)
    generate: the shallow token if conf >= τ, else run the upper layers and take the deep token

``base`` is a plain `TransformerLM` of all layers whose own norm/head are the deep exit, so the
deep model is an ordinary checkpoint (``legolm generate`` and ``export`` work on it), and
`LegoLM.lower` / `LegoLM.forward_upper_layers` run the two halves (with KV caches when decoding).
Before `extend` the model is the shallow one alone: ``split == n_layer`` and the base's own
norm/head are the shallow exit.

Routing weights: w = sigmoid((conf - τ) / T) is 1/2 exactly at the calibrated threshold, monotone
in the shallow confidence, differentiable, and tends to the generation rule (w = 1 iff conf >= τ)
as T -> 0; the routed distribution is the mixture w · p_s + (1 - w) · p_d, so its perplexity is a
proper likelihood. The same function weighs the phase-2 loss and every reported routed perplexity.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from legolm.checkpoints.native import CONFIG_NAME, load_checkpoint, save_checkpoint
from legolm.data.tokenizer import Tokenizer
from legolm.errors import CheckpointError, ConfigError
from legolm.layers.norms import make_norm
from legolm.model.config import ModelConfig
from legolm.model.kv_cache import KVCache
from legolm.model.transformer import TransformerLM
from legolm.utils.io import atomic_dir

LEGO_META = "lego.json"
EXIT_WEIGHTS = "lego/shallow_exit.safetensors"  # in a subfolder: the base loader reads every top-level file


# -- routing ---------------------------------------------------------------------------------------
def confidence(logits: Tensor) -> Tensor:
    """Max softmax probability, in fp32: (..., V) -> (...)."""
    logits = logits.float()
    return (logits.amax(-1) - logits.logsumexp(-1)).exp()


def exits(conf: Tensor, threshold: float) -> Tensor:
    """The generation rule: exit (keep the shallow token) where ``conf >= threshold``.

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


# -- model -----------------------------------------------------------------------------------------
class ExitHead(nn.Module):
    """Final norm + LM head of one exit: (B, T, C) -> (B, T, vocab)."""

    def __init__(self, norm: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, h: Tensor) -> Tensor:
        return self.head(self.norm(h))


@dataclass
class LegoMeta:
    """What a LEGO checkpoint stores besides the weights.

    Attributes:
        split: Lower layers (the shallow model's depth).
        trained: Phase 1 has trained the shallow model (`extend` refuses an untrained one).
        routing_threshold: Calibrated shallow confidence threshold τ (None before calibration).
        routing_temperature: T of the continuous routing weight sigmoid((conf - τ) / T).
        target_ratio: Fraction of validation tokens below τ when it was calibrated.
    """

    split: int
    trained: bool = False
    routing_threshold: float | None = None
    routing_temperature: float = 0.05
    target_ratio: float | None = None


@dataclass
class LegoOutput:
    """Logits of both exits (deep is None before `extend`) and the shallow confidence (B, T)."""

    shallow_logits: Tensor
    deep_logits: Tensor | None
    conf: Tensor


class LegoLM(nn.Module):
    """A `TransformerLM` with a frozen shallow exit after layer ``split`` and a deep exit on top.

    Args:
        base: All layers; its norm/head are the deep exit (the shallow one before `extend`).
        meta: Split, phase-1 flag and routing settings.
        shallow_exit: The shallow exit after `extend` (None before).
    """

    def __init__(self, base: TransformerLM, meta: LegoMeta | None = None, shallow_exit: ExitHead | None = None) -> None:
        super().__init__()
        self.base = base
        self.meta = meta or LegoMeta(split=base.config.n_layer)
        self.shallow_exit = shallow_exit
        if not 1 <= self.meta.split <= base.config.n_layer:
            raise ConfigError(f"LEGO split {self.meta.split} must be in [1, {base.config.n_layer}]")

    # -- properties ----------------------------------------------------------------------------
    @property
    def config(self) -> ModelConfig:
        return self.base.config

    @property
    def split(self) -> int:
        return self.meta.split

    @property
    def n_layer(self) -> int:
        return self.base.config.n_layer

    @property
    def extended(self) -> bool:
        return self.shallow_exit is not None

    @property
    def threshold(self) -> float:
        if self.meta.routing_threshold is None:
            raise ConfigError("this LEGO model has no routing threshold yet; calibrate one with "
                              "compute_confidence_threshold and pass it to extend()")
        return self.meta.routing_threshold

    # -- forward -------------------------------------------------------------------------------
    def lower(self, idx: Tensor, *, cache: KVCache | None = None, input_pos: Tensor | None = None,
              positions: Tensor | None = None) -> Tensor:
        """Embeddings and the lower layers: (B, T) ids -> (B, T, C) hidden states h_s.

        (Not ``base(idx, end=split)``: before `extend`, split is the top and that would project.)
        """
        B, T = idx.shape
        if positions is None:
            positions = (input_pos if input_pos is not None else torch.arange(T, device=idx.device)).expand(B, T)
        h = self.base.embed(idx, positions)  # (B, T, C)
        ctx = self.base.make_context(positions, h.dtype, cache, input_pos)
        return self.base.forward_layers(h, ctx, 0, self.split, cache).hidden

    def shallow_head(self, h_s: Tensor) -> Tensor:
        """The shallow exit on lower-layer states: (B, T, C) -> (B, T, V)."""
        return self.shallow_exit(h_s) if self.shallow_exit is not None else self.base.project(h_s)

    def forward_upper_layers(self, h: Tensor, start_layer: int | None = None, *, cache: KVCache | None = None,
                             input_pos: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """Upper layers from ``start_layer`` (default: split) and the deep exit: (B, T, C) -> (B, T, V).

        ``cache``, ``input_pos`` and ``positions`` are those of `TransformerLM.forward`.
        """
        start = self.split if start_layer is None else start_layer
        return self.base(h, start=start, cache=cache, input_pos=input_pos, positions=positions)

    def upper_last_logits(self, h: Tensor, *, cache: KVCache | None = None, input_pos: Tensor | None = None,
                          positions: Tensor | None = None) -> Tensor:
        """Upper layers over ``h`` (B, T, C), writing their K/V to ``cache``; the deep exit on the last position only.

        Returns:
            Deep logits of the last token (B, V): decoding needs no others (a fill-mode call catching
            up k queued tokens does not project them through the head).
        """
        B, T = h.shape[0], h.shape[1]
        if positions is None:
            positions = (input_pos if input_pos is not None else torch.arange(T, device=h.device)).expand(B, T)
        ctx = self.base.make_context(positions, h.dtype, cache, input_pos)
        top = self.base.forward_layers(h, ctx, self.split, None, cache).hidden  # (B, T, C)
        return self.base.project(top[:, -1])

    def upper_hidden(self, h: Tensor, positions: Tensor | None = None) -> Tensor:
        """The upper layers without the exit, full causal attention: (B, T, C) -> (B, T, C)."""
        B, T = h.shape[0], h.shape[1]
        pos = positions if positions is not None else torch.arange(T, device=h.device).expand(B, T)
        ctx = self.base.make_context(pos, h.dtype)
        return self.base.forward_layers(h, ctx, self.split).hidden

    def forward(self, idx: Tensor) -> LegoOutput:
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
        """Record that phase 1 trained the shallow model (saved with the checkpoint)."""
        self.meta.trained = True

    def extend(self, num_layers: int, routing_threshold: float, freeze_lower: bool = True,
               layer_type: str | None = None) -> LegoLM:
        """Add upper layers on top of the trained shallow model, in place.

        Embeddings and lower layers are copied (and frozen with ``freeze_lower``); the shallow
        exit becomes a frozen copy of the trained norm/head; the deep exit is another copy that
        trains. The new layers are freshly initialised with the base model's init; their
        residual outputs start near zero, so the deep exit starts close to the shallow one.

        Args:
            num_layers: Total depth after extension (> the current depth).
            routing_threshold: Calibrated confidence threshold τ in [0, 1].
            freeze_lower: Freeze embeddings and lower layers (phase 2 needs it: it trains on their
                stored outputs).
            layer_type: Registered type of the new layers (default: that of the top layer).

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
        old = self.base
        kind = layer_type or old.config.layers[-1]
        cfg = ModelConfig.from_dict({**old.config.to_dict(), "tie_embeddings": False,
                                     "layers": [*old.config.layers, *[kind] * (num_layers - old.config.n_layer)]})
        new = TransformerLM(cfg).to(device=old.wte.weight.device, dtype=old.wte.weight.dtype)
        new.wte.load_state_dict(old.wte.state_dict())
        if old.wpe is not None and new.wpe is not None:
            new.wpe.load_state_dict(old.wpe.state_dict())
        for i, block in enumerate(old.blocks):
            new.blocks[i].load_state_dict(block.state_dict())
        new.norm.load_state_dict(old.norm.state_dict())
        new.lm_head.weight.data.copy_(old.lm_head.weight.data)
        shallow = ExitHead(copy.deepcopy(old.norm), nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False))
        shallow.head.weight = nn.Parameter(old.lm_head.weight.detach().clone())
        self.base, self.shallow_exit = new, shallow.to(old.wte.weight.device)
        self.meta.split, self.meta.routing_threshold = old.config.n_layer, routing_threshold
        self.freeze(freeze_lower)
        return self

    def freeze(self, freeze_lower: bool = True) -> None:
        """Shallow exit frozen always; embeddings and lower layers with ``freeze_lower``; the rest trains."""
        lower = [self.base.wte, *([self.base.wpe] if self.base.wpe is not None else []),
                 *self.base.blocks[: self.split]]
        for p in self.parameters():
            p.requires_grad_(True)
        for module in lower if freeze_lower else []:
            module.requires_grad_(False)
        if self.shallow_exit is not None:
            self.shallow_exit.requires_grad_(False)

    def shallow_model(self) -> TransformerLM:
        """The shallow model alone as a `TransformerLM` (layers 0..split-1 and the shallow exit, shared weights)."""
        if not self.extended:
            return self.base
        c = self.config
        cfg = ModelConfig.from_dict({**c.to_dict(), "layers": c.layers[: self.split], "tie_embeddings": False})
        with torch.device("meta"):
            model = TransformerLM(cfg)
        assert self.shallow_exit is not None
        model.wte, model.wpe = self.base.wte, self.base.wpe
        model.blocks = nn.ModuleList(self.base.blocks[: self.split])
        model.norm, model.lm_head = self.shallow_exit.norm, self.shallow_exit.head
        model.rope = self.base.rope
        return model.train(self.training)


def rewind(batches: object) -> None:
    """Start a batch source (`WindowBatches`, ...) from its first batch: a previous pass may have stopped early."""
    set_epoch = getattr(batches, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(0)


def check_threshold(threshold: float) -> None:
    """Raise `ConfigError` unless ``threshold`` is a probability in [0, 1]."""
    if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0) or math.isnan(threshold):
        raise ConfigError(f"routing threshold must be in [0, 1] (a max softmax probability), got {threshold}")


# -- checkpoints -----------------------------------------------------------------------------------
def save_lego(model: LegoLM, directory: str | Path, tokenizer: Tokenizer | None = None,
              overwrite: bool = False) -> Path:
    """Write a legolm checkpoint of the deep (base) model plus ``lego.json`` and the shallow exit.

    The directory loads as a plain model with `load_pretrained` (the deep model) and as the whole
    LEGO model with `load_lego`.
    """
    with atomic_dir(directory, overwrite) as tmp:
        save_checkpoint(model.base, tmp, tokenizer, overwrite=True)
        (tmp / LEGO_META).write_text(json.dumps(asdict(model.meta), indent=2) + "\n")
        if model.shallow_exit is not None:
            state = {k: v.detach().to("cpu").contiguous() for k, v in model.shallow_exit.state_dict().items()}
            (tmp / EXIT_WEIGHTS).parent.mkdir()
            save_file(state, str(tmp / EXIT_WEIGHTS))
    return Path(directory)


def load_lego(directory: str | Path, device: str | torch.device = "cpu") -> LegoLM:
    """Load a checkpoint written by `save_lego` (eval mode, trainable flags as after `extend`)."""
    path = Path(directory)
    if not (path / LEGO_META).is_file() or not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} is not a LEGO checkpoint (no {LEGO_META} / {CONFIG_NAME}); "
                              "give a directory written by `legolm lego` or save_lego")
    try:
        meta = LegoMeta(**json.loads((path / LEGO_META).read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{path / LEGO_META} is not valid LEGO metadata ({err})") from None
    base = load_checkpoint(path)
    shallow = None
    if meta.split < base.config.n_layer:
        shallow = ExitHead(make_norm(base.config), nn.Linear(base.config.n_embd, base.config.vocab_size, bias=False))
        try:
            shallow.load_state_dict(load_file(str(path / EXIT_WEIGHTS)))
        except (OSError, RuntimeError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"cannot read the shallow exit {path / EXIT_WEIGHTS} ({first})") from None
    model = LegoLM(base, meta, shallow).to(device).eval()
    if shallow is not None:
        model.freeze(True)
    return model

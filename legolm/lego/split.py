"""LEGO from a pretrained model: a shallow exit after block k, and k chosen by a measured curve.

The first k blocks of a real model get an exit of their own: an affine lens (identity at first)
into a copy of the model's final norm and the model's own head, the lens and norm trained while the
model stays frozen (the "tuned lens" of Belrose et al. 2023, "Eliciting Latent Predictions from
Transformers with the Tuned Lens", arXiv 2303.08112). The upper blocks are the model's own, so the
deep exit starts as the unmodified model.

Phase 1 of the candidates trains one exit per candidate k in one pass over the data (the frozen
model runs once per batch; `ExitProbeLoss` averages the exits' losses). Then, with the model's own
upper layers as the deep exit, each k is measured on the validation windows::

    shallow ppl, τ_k (the quantile of conf at target_ratio, or with ``calibrate: quality`` the most
    exits whose routed ppl stays within tolerance of the full model's), routed ppl at τ_k (soft weights),
    cost(k) = [k·B + H + (1 - r)·((L - k)·B + H)] / (L·B + H)

with B the weights of one block, H those of one head and r the shallow ratio at τ_k
(a batch-1 decode step reads every weight it uses once, so bytes read is its cost). With
``split_cost: decode`` the cost is measured instead (`decode_costs`): each candidate decodes real
prompts with the run's decoder, and

    decode cost(k) = [r·t(always exit) + (1 - r)·t(never exit)] / t(full depth)   (seconds per token)

The chosen k is the cheapest whose routed perplexity is within ``tolerance`` of the full model's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from legolm.errors import ConfigError
from legolm.generation.generate import clear_sessions
from legolm.lego.config import STORE_DTYPES, DecodeSettings, LegoSettings
from legolm.lego.evaluate import TokenScores
from legolm.lego.report import Setting, measure_decode
from legolm.model.lego import ExitHead, LegoLM, LegoMeta, confidence, quantile_threshold
from legolm.model.transformer import TransformerLM
from legolm.train.batches import Batch, rewind
from legolm.train.fit import LossOutput
from legolm.train.head_loss import token_cross_entropy
from legolm.train.optim import scale_lr
from legolm.utils.finite import safe_exp
from legolm.utils.io import atomic_savefig, pyplot


class ExitProbe(nn.Module):
    """A pretrained model with one trainable exit after each of ``splits`` blocks.

    Args:
        model: The pretrained model: frozen here, or trained with the exits (``train_model``).
        splits: Block counts below each exit, each in [1, n_layer - 1].
        train_model: Train the model too (LayerSkip's early-exit loss, `ExitProbeLoss`).
        exit_lr_scale: Where the model trains too, the exits' learning rate as a multiple of the model's.
    """

    def __init__(self, model: TransformerLM, splits: list[int], train_model: bool = False,
                 exit_lr_scale: float = 1.0) -> None:
        super().__init__()
        L = model.config.n_layer
        bad = [k for k in splits if not 1 <= k < L]
        if bad or not splits:
            raise ConfigError(f"split candidates must be in [1, {L - 1}] (blocks below the shallow exit), got "
                              f"{splits}")
        self.model = model.requires_grad_(train_model)
        self.train_model = train_model
        self.splits = sorted(set(splits))
        self.exits = nn.ModuleDict({str(k): ExitHead.tuned_lens(model.norm, model.lm_head) for k in self.splits})
        for e in self.exits.values():
            e.trainable()  # type: ignore[operator]
        if train_model:  # the lenses and norms are the exits' own; their head is the model's (shared)
            shared = {id(p) for p in model.parameters()}
            scale_lr([p for p in self.exits.parameters() if id(p) not in shared], exit_lr_scale)

    def hidden(self, idx: Tensor) -> dict[int, Tensor]:
        """Hidden states after each split: {k: (B, T, C)} (no gradient unless the model trains)."""
        return self._forward(idx, max(self.splits))[0]

    def hidden_and_logits(self, idx: Tensor) -> tuple[dict[int, Tensor], Tensor]:
        """Hidden states after each split and the model's own logits (B, T, V), in one pass over the blocks."""
        hidden, out = self._forward(idx, self.model.config.n_layer)
        return hidden, self.model.lm_head(self.model.norm(out))

    def _forward(self, idx: Tensor, end: int) -> tuple[dict[int, Tensor], Tensor]:
        B, T = idx.shape
        positions = torch.arange(T, device=idx.device).expand(B, T)
        with torch.set_grad_enabled(self.train_model and torch.is_grad_enabled()):
            h = self.model.embed(idx, positions)
            ctx = self.model.make_context(positions, h.dtype)
            out = self.model.forward_layers(h, ctx, 0, end, capture=[k - 1 for k in self.splits])
        return {k: out.captured[k - 1] for k in self.splits}, out.hidden

    def exit(self, k: int) -> ExitHead:
        return self.exits[str(k)]  # type: ignore[return-value]


class ExitProbeLoss:
    """Phase 1 of the candidates: the mean next-token cross-entropy of the probe's exits; where the model trains
    too, CE(deep) + ``joint_weight`` · that mean (LayerSkip's early-exit loss)."""

    def __init__(self, joint_weight: float = 0.0) -> None:
        self.joint_weight = joint_weight

    def __call__(self, module: nn.Module, batch: Batch) -> LossOutput:
        probe = module if isinstance(module, ExitProbe) else getattr(module, "module", module)
        assert isinstance(probe, ExitProbe)
        labels = batch["labels"]
        if not probe.train_model:
            hidden = probe.hidden(batch["input_ids"])
            return self._exits(probe, hidden, labels), labels.numel(), {}
        hidden, logits = probe.hidden_and_logits(batch["input_ids"])
        deep, exits = token_cross_entropy(logits, labels), self._exits(probe, hidden, labels)
        return deep + self.joint_weight * exits, labels.numel(), {"deep": deep.detach(), "exits": exits.detach()}

    @staticmethod
    def _exits(probe: ExitProbe, hidden: dict[int, Tensor], labels: Tensor) -> Tensor:
        return torch.stack([token_cross_entropy(probe.exit(k)(h), labels) for k, h in hidden.items()]).mean()


class ExitLoss:
    """Next-token cross-entropy of a `LegoLM`'s shallow exit (phase 1 of one pretrained split)."""

    def __call__(self, module: nn.Module, batch: Batch) -> LossOutput:
        model = module if isinstance(module, LegoLM) else getattr(module, "module", module)
        assert isinstance(model, LegoLM)
        with torch.no_grad():
            h_s = model.lower(batch["input_ids"])
        return token_cross_entropy(model.shallow_head(h_s), batch["labels"]), batch["labels"].numel(), {}


@dataclass
class SplitPoint:
    """One candidate split, measured on the validation windows with the model's own upper layers.

    Attributes:
        split: Blocks below the exit.
        shallow_ppl: Perplexity of the trained exit alone.
        threshold: τ calibrated at the target ratio.
        routed_ppl: Soft-routed perplexity at τ (the exit and the unmodified deep model).
        hard_routed_ppl: Perplexity under generation's hard rule at τ.
        full_ppl: The full-depth model's perplexity (the same for every candidate).
        shallow_ratio: Validation tokens that exit at τ.
        cost: Projected weights read per decoded token, ÷ the full model's (module docstring).
        within_tolerance: routed_ppl <= (1 + tolerance) · reference_ppl.
        reference_ppl: The unmodified model's perplexity: full_ppl, unless the model trained with its exits.
        decode_cost: Measured seconds per decoded token ÷ full depth's (`decode_costs`; None: not measured).
    """

    split: int
    shallow_ppl: float
    threshold: float
    routed_ppl: float
    hard_routed_ppl: float
    full_ppl: float
    shallow_ratio: float
    cost: float
    within_tolerance: bool
    reference_ppl: float
    decode_cost: float | None = None


def projected_cost(model: TransformerLM, split: int, shallow_ratio: float) -> float:
    """Weights a batch-1 early-exit step reads ÷ those of a full-depth step (module docstring)."""
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    head = model.lm_head.weight.numel()
    lower, upper = sum(blocks[:split]) + head, sum(blocks[split:]) + head
    return (lower + (1.0 - shallow_ratio) * upper) / (sum(blocks) + head)


def calibrated_threshold(scores: TokenScores, settings: LegoSettings, reference_ppl: float) -> float:
    """τ by ``settings.calibrate``: the target_ratio quantile, or the most exits within tolerance of the reference."""
    if settings.calibrate == "quality":
        return scores.quality_threshold(reference_ppl, settings.split_tolerance, settings.routing_temperature,
                                        settings.quality_grid)
    return quantile_threshold(scores.conf, settings.target_ratio)


@torch.no_grad()
def measure_splits(probe: ExitProbe, batches: Iterable[Batch], settings: LegoSettings,
                   max_batches: int | None = None, progress: bool = False,
                   reference_ppl: float | None = None) -> list[SplitPoint]:
    """Each candidate exit and the full model over the validation windows (one forward per batch); τ and the
    tolerance relative to ``reference_ppl`` (the unmodified model's; None: the full model measured here)."""
    was_training = probe.training
    probe.eval()
    device = next(probe.parameters()).device
    parts: dict[int, dict[str, list[Tensor]]] = {k: {"lp": [], "conf": []} for k in probe.splits}
    deep: list[Tensor] = []
    rewind(batches)
    for i, batch in enumerate(tqdm(batches, desc="split curve", unit="batch", disable=not progress)):
        if max_batches is not None and i >= max_batches:
            break
        idx, labels = batch["input_ids"].to(device), batch["labels"].to(device)[..., None]
        deep.append(probe.model(idx).float().log_softmax(-1).gather(-1, labels).flatten().cpu())
        for k, h in probe.hidden(idx).items():
            logits = probe.exit(k)(h)
            parts[k]["lp"].append(logits.float().log_softmax(-1).gather(-1, labels).flatten().cpu())
            parts[k]["conf"].append(confidence(logits).flatten().cpu())
    probe.train(was_training)
    if not deep:
        raise ConfigError("no validation batches to measure the split candidates on")
    deep_lp = torch.cat(deep)
    full_ppl = safe_exp(-float(deep_lp.double().mean()))
    reference = full_ppl if reference_ppl is None else reference_ppl
    points = []
    temperature, tolerance = settings.routing_temperature, settings.split_tolerance
    for k in probe.splits:
        scores = TokenScores(torch.cat(parts[k]["lp"]), deep_lp, torch.cat(parts[k]["conf"]))
        tau = calibrated_threshold(scores, settings, reference)
        routed = scores.routed_ppl(tau, temperature)
        ratio = scores.shallow_ratio(tau)
        points.append(SplitPoint(k, scores.shallow_ppl(), tau, routed, scores.hard_routed_ppl(tau), full_ppl, ratio,
                                 projected_cost(probe.model, k, ratio), routed <= (1.0 + tolerance) * reference,
                                 reference))
    return points


def choose_split(points: list[SplitPoint]) -> SplitPoint:
    """The cheapest candidate within tolerance, by measured decode cost where the points have one, else by
    projected weights; else the best routed perplexity (reported as missing it)."""
    ok = [p for p in points if p.within_tolerance]
    return min(ok, key=lambda p: p.cost if p.decode_cost is None else p.decode_cost) if ok else \
        min(points, key=lambda p: p.routed_ppl)


def decode_costs(probe: ExitProbe, points: list[SplitPoint], prompts: Tensor, decode: DecodeSettings,
                 progress: bool = False) -> list[SplitPoint]:
    """``points`` with their measured decode cost (``lego.split_cost: decode``).

    For each candidate k, a copy of the model split at k with its trained exit (in ``decode.dtype``, on the
    probe's device; the probe itself is not touched) decodes ``prompts`` as `legolm.lego.report.measure_decode`
    times them (batch 1, greedy, whole `generate` calls, the decode section's decoder: fused on a GPU), at
    full depth, always exiting (τ = 0) and never exiting (τ = 1), in ``decode.kv_mode``. With r the candidate's
    shallow ratio at its τ, the cost of a decode whose tokens exit at rate r is charged per token at those
    two extremes: (r·t(always) + (1 − r)·t(never)) / t(full depth), seconds per token each.
    """
    settings = [Setting("full depth", "full"), Setting("always exit", "threshold", 0.0, decode.kv_mode),
                Setting("never exit", "threshold", 1.0, decode.kv_mode)]
    out = []
    for p in points:
        lego = LegoLM.adopt(copy.deepcopy(probe.model), LegoMeta(split=p.split, exit_lens=True),
                            copy.deepcopy(probe.exit(p.split))).to(STORE_DTYPES[decode.dtype]).eval()
        full, always, never = (m.wall_s / m.tokens for m in measure_decode(
            lego, prompts, settings, decode.max_new_tokens, decode.fused, decode.fused_kernel, decode.repeats,
            decode.warmup, progress))
        out.append(replace(p, decode_cost=(p.shallow_ratio * always + (1.0 - p.shallow_ratio) * never) / full))
        clear_sessions(lego)  # its cached KV caches and CUDA graphs (fused decoding) go with the copy
    return out


def plot_splits(points: list[SplitPoint], path: Path, tolerance: float) -> str | None:
    """Perplexities and projected (and measured) cost against the split (PNG); a note instead without matplotlib."""
    plt = pyplot()
    if plt is None:
        return f"{path.name} skipped: pip install matplotlib to draw the split curve"
    ks = [p.split for p in points]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(ks, [p.shallow_ppl for p in points], "o--", label="shallow exit alone")
    ax.plot(ks, [p.routed_ppl for p in points], "s-", label="routed at τ (model's own upper layers)")
    full, reference = points[0].full_ppl, points[0].reference_ppl
    ax.axhline(full, color="black", ls=":", label=f"full model {full:.2f}")
    if reference != full:  # the model trained with its exits
        ax.axhline(reference, color="tab:red", ls=":", label=f"unmodified model {reference:.2f}")
    ax.axhline(reference * (1 + tolerance), color="gray", ls=":", label=f"+{100 * tolerance:.0f}% of the unmodified")
    ax.set_yscale("log")
    ax.set_xlabel("blocks below the shallow exit (k)")
    ax.set_ylabel("validation perplexity")
    twin = ax.twinx()
    twin.plot(ks, [p.cost for p in points], "^-.", color="tab:green", label="projected cost (weights read)")
    if all(p.decode_cost is not None for p in points):
        twin.plot(ks, [p.decode_cost for p in points], "v-", color="tab:purple", label="measured decode cost")
    twin.set_ylabel("cost per token ÷ full depth")
    ax.legend(fontsize=7, loc="upper right")
    twin.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    return None

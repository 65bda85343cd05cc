"""How low-rank is a fine-tuning update? Singular values and energy of weight deltas, per layer.

For a delta ΔW (full fine-tune minus base, a merged LoRA minus base, or a LoRA's s·BA) with
singular values s_1 ≥ s_2 ≥ …, the cumulative energy is

    E(r) = Σ_{i≤r} s_i² / Σ_i s_i²

and the rank kept at energy τ is the smallest r with E(r) ≥ τ. By Eckart–Young, 1 − E(r) is the
squared relative Frobenius error of the best rank-r approximation, which `init_lora_from_delta`
puts into a LoRA (the "intrinsic rank" argument of Hu et al. 2021, arXiv:2106.09685, §7).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from legolm.adapters.base import adapter_layers
from legolm.adapters.lora import LoRALinear
from legolm.errors import ConfigError, LegolmError
from legolm.utils.io import atomic_savefig, pyplot

ENERGY_PNG = "energy.png"
PLOT_NOTE = f"{ENERGY_PNG} skipped: pip install 'legolm[plot]' (matplotlib) to draw it"


@dataclass
class RankProfile:
    """Spectrum of one layer's delta.

    Attributes:
        name: Module name.
        shape: (d_out, d_in).
        singular_values: Descending singular values (float64).
    """

    name: str
    shape: tuple[int, int]
    singular_values: Tensor

    @property
    def energy(self) -> Tensor:
        return energy_curve(self.singular_values)

    @property
    def norm(self) -> float:
        """Frobenius norm of the delta."""
        return float(self.singular_values.square().sum().sqrt())

    def rank_for(self, threshold: float) -> int:
        return rank_for_energy(self.energy, threshold)


def energy_curve(s: Tensor) -> Tensor:
    """E(r) for r = 1..len(s); all zeros for a zero delta."""
    power = s.double().square()
    total = power.sum()
    return power.cumsum(0) / total if total > 0 else torch.zeros_like(power)


def rank_for_energy(energy: Tensor, threshold: float) -> int:
    """Smallest r with E(r) ≥ threshold (0 for a zero delta)."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"energy threshold must be in (0, 1], got {threshold}; e.g. 0.9")
    if energy.numel() == 0 or energy[-1] == 0:
        return 0
    # Round-off can leave E(n) a hair under 1; never report more than the full rank.
    hit = torch.nonzero(energy >= threshold - 1e-12)
    return int(hit[0]) + 1 if hit.numel() else energy.numel()


def rank_profiles(deltas: dict[str, Tensor]) -> list[RankProfile]:
    """Singular values of every delta (computed in float64).

    Raises:
        LegolmError: A delta holds NaN/inf (its singular values do not exist).
    """
    out = []
    for name, delta in deltas.items():
        if not bool(torch.isfinite(delta).all()):
            raise LegolmError(f"the weight delta of {name} holds NaN/inf values, so it has no rank profile; "
                              "check the --base and --tuned/--adapter weights (a diverged run?)")
        s = torch.linalg.svdvals(delta.detach().to("cpu", torch.float64))
        out.append(RankProfile(name, (delta.shape[0], delta.shape[1]), s))
    return out


# -- where deltas come from ----------------------------------------------------------------------
def _linear_weights(model: nn.Module) -> dict[str, Tensor]:
    """Weights of the plain linear layers; a head tied to the embedding is left out."""
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    return {name: m.weight for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not (tied and name == "lm_head")}


def checkpoint_deltas(base: nn.Module, tuned: nn.Module) -> dict[str, Tensor]:
    """W_tuned − W_base for every linear layer of two models of the same architecture."""
    a, b = _linear_weights(base), _linear_weights(tuned)
    if a.keys() != b.keys():
        diff = sorted(set(a) ^ set(b))
        raise LegolmError(f"the two models have different layers (e.g. {diff[:2]}); compare checkpoints of one "
                          "architecture (a fine-tune and its base)")
    for name in a:
        if a[name].shape != b[name].shape:
            raise LegolmError(f"{name} is {tuple(a[name].shape)} in the base but {tuple(b[name].shape)} in the "
                              "tuned model; compare a fine-tune with its own base")
    return {name: (b[name].detach().double() - a[name].detach().double()) for name in a}


def lora_deltas(model: nn.Module) -> dict[str, Tensor]:
    """s·BA of every LoRA layer (nothing is merged)."""
    return {name: layer.delta_weight().detach() for name, layer in adapter_layers(model).items()
            if isinstance(layer, LoRALinear)}


@torch.no_grad()
def init_lora_from_delta(layer: LoRALinear, delta: Tensor) -> None:
    """Set A, B so that s·BA is the best rank-r approximation of ``delta`` (truncated SVD).

    With ΔW/s = U Σ Vᵀ: B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ (the singular values split evenly).

    Raises:
        ConfigError: ``delta`` does not have the layer's (d_out, d_in) shape.
    """
    if tuple(delta.shape) != (layer.out_features, layer.in_features):
        raise ConfigError(f"delta of shape {tuple(delta.shape)} does not fit a LoRA layer of "
                          f"{(layer.out_features, layer.in_features)}")
    u, s, vh = torch.linalg.svd(delta.detach().to("cpu", torch.float64) / layer.scaling, full_matrices=False)
    r = min(layer.r, s.numel())
    root = s[:r].sqrt()
    b = torch.zeros(layer.out_features, layer.r, dtype=torch.float64)
    a = torch.zeros(layer.r, layer.in_features, dtype=torch.float64)
    b[:, :r], a[:r] = u[:, :r] * root, root[:, None] * vh[:r]
    layer.lora_B.copy_(b)
    layer.lora_A.copy_(a)


# -- outputs -------------------------------------------------------------------------------------
def rank_rows(profiles: list[RankProfile], thresholds: list[float]) -> list[dict[str, Any]]:
    """One table row per layer: shape, norm, top singular value, rank kept at each threshold."""
    rows = []
    for p in profiles:
        row: dict[str, Any] = {"layer": p.name, "shape": f"{p.shape[0]}x{p.shape[1]}", "full_rank": min(p.shape),
                               "frobenius": round(p.norm, 6),
                               "top_singular": round(float(p.singular_values[0]), 6) if p.norm else 0.0}
        row.update({f"rank@{t:g}": p.rank_for(t) for t in thresholds})
        rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def write_rank_outputs(profiles: list[RankProfile], thresholds: list[float], directory: Path,
                       plot: bool = True, max_rank: int | None = None) -> list[Path]:
    """``rank.csv``, ``rank.json`` (rows + energy curves) and, with ``plot`` and matplotlib, ``energy.png`` in
    ``directory``; returns the files written."""
    rows = rank_rows(profiles, thresholds)
    with open(directory / "rank.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    curves = {p.name: [round(float(e), 6) for e in p.energy[:max_rank]] for p in profiles}
    (directory / "rank.json").write_text(json.dumps({"thresholds": thresholds, "layers": rows,
                                                     "energy": curves}, indent=1) + "\n")
    paths = [directory / "rank.csv", directory / "rank.json"]
    png = plot_energy(profiles, thresholds, directory / ENERGY_PNG, max_rank) if plot else None
    return [*paths, png] if png is not None else paths


def plot_energy(profiles: list[RankProfile], thresholds: list[float], path: Path,
                max_rank: int | None = None) -> Path | None:
    """E(r) of every layer on one chart; None (no file) when the optional ``matplotlib`` is missing."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    cmap = plt.get_cmap("viridis")
    for i, p in enumerate(profiles):
        e = p.energy[:max_rank].numpy()
        ax.plot(range(1, len(e) + 1), e, color=cmap(i / max(1, len(profiles) - 1)), lw=1, alpha=0.8)
    for t in thresholds:
        ax.axhline(t, color="grey", ls="--", lw=0.8)
        ax.text(1, t, f" {t:g}", va="bottom", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("rank r")
    ax.set_ylabel("cumulative energy E(r)")
    ax.set_title(f"Weight-delta energy, {len(profiles)} layers (colour: depth order)")
    ax.set_ylim(0, 1.02)
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=120)


def summary(profiles: list[RankProfile], thresholds: list[float]) -> str:
    """Median and max rank kept at each threshold, over the layers that changed."""
    changed = [p for p in profiles if p.norm > 0]
    parts = []
    for t in thresholds:
        ranks = sorted(p.rank_for(t) for p in changed)
        if ranks:
            parts.append(f"E≥{t:g}: median rank {ranks[len(ranks) // 2]}, max {ranks[-1]}")
    return f"{len(changed)}/{len(profiles)} layers changed; " + "; ".join(parts) if parts else "no layer changed"


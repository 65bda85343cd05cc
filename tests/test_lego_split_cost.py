"""``lego.split_cost: decode``: the split candidates' cost measured by decoding instead of projected from weights."""

from __future__ import annotations

import dataclasses
import gc
import math
import weakref
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import legolm.lego.split as split_module
from legolm.core.config import ModelConfig
from legolm.errors import ConfigError
from legolm.lego.config import DecodeSettings, LegoConfig, LegoSettings
from legolm.lego.split import ExitProbe, SplitPoint, choose_split, decode_costs, measure_splits
from legolm.model.lego import LegoLM
from legolm.model.transformer import TransformerLM
from legolm.train.config import ModelSpec


def _probe() -> ExitProbe:
    torch.manual_seed(0)
    return ExitProbe(TransformerLM(ModelConfig.from_name("tiny-pythia", layers=["pythia"] * 4)), [1, 2])


def _points(probe: ExitProbe) -> list[SplitPoint]:
    ids = torch.randint(0, probe.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids, "labels": torch.roll(ids, -1, 1)}]
    return measure_splits(probe, batches, LegoSettings(split_candidates=[1, 2], calibrate="ratio", target_ratio=0.5))


def _point(split: int, cost: float, decode_cost: float | None, within: bool = True) -> SplitPoint:
    return SplitPoint(split, 10.0, 0.5, 5.0, 5.0, 4.0, 0.5, cost, within, 4.0, decode_cost)


def test_the_choice_follows_the_measured_cost_where_there_is_one() -> None:
    """Among the candidates within tolerance: the least projected cost without measurements, the least measured
    cost with them (here the other candidate); none within: the best routed perplexity."""
    weights = [_point(1, 0.8, None), _point(2, 0.9, None), _point(3, 0.5, None, within=False)]
    assert choose_split(weights).split == 1
    measured = [_point(1, 0.8, 1.1), _point(2, 0.9, 0.7), _point(3, 0.5, 0.1, within=False)]
    assert choose_split(measured).split == 2


def test_the_decode_cost_charges_each_token_at_the_measured_extremes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the timings stubbed (full depth 4 s, always exit 1 s, never exit 5 s for 8 tokens): cost =
    (r · 1 + (1 − r) · 5) / 4 for each candidate's own shallow ratio r; each candidate decodes a copy of the
    model split at its k, in the decode dtype, and the probe is left as it was."""
    probe = _probe()
    points = _points(probe)
    before = {k: v.clone() for k, v in probe.state_dict().items()}
    seen: list[tuple[int, torch.dtype, list[Any]]] = []

    def fake(model: LegoLM, prompts: torch.Tensor, settings: list[Any], *args: Any) -> list[Any]:
        seen.append((model.split, next(model.parameters()).dtype, [(s.mode, s.threshold) for s in settings]))
        probe_storage = {q.data_ptr() for q in probe.parameters()}
        assert all(p.data_ptr() not in probe_storage for p in model.parameters())
        return [SimpleNamespace(wall_s=t, tokens=8) for t in (4.0, 1.0, 5.0)]

    monkeypatch.setattr(split_module, "measure_decode", fake)
    got = decode_costs(probe, points, torch.zeros(1, 4, dtype=torch.long), DecodeSettings(dtype="bfloat16"))
    assert [s[0] for s in seen] == [1, 2] and all(s[1] == torch.bfloat16 for s in seen)
    assert seen[0][2] == [("full", None), ("threshold", 0.0), ("threshold", 1.0)]
    for p, g in zip(points, got, strict=True):
        assert g.decode_cost == pytest.approx((p.shallow_ratio * 1.0 + (1 - p.shallow_ratio) * 5.0) / 4.0)
        assert dataclasses.replace(g, decode_cost=None) == p
    after = probe.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_the_decode_cost_is_measured_by_real_decoding_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unstubbed decoding: each candidate decodes real prompts with the torch decoders; every cost is finite and
    > 0, and no copy of the model outlives the measurement."""
    probe = _probe()
    points = _points(probe)
    ids = torch.randint(0, probe.model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    copies: list[weakref.ref[LegoLM]] = []
    real = split_module.measure_decode

    def spy(model: LegoLM, *args: Any) -> Any:
        copies.append(weakref.ref(model))
        return real(model, *args)

    monkeypatch.setattr(split_module, "measure_decode", spy)
    got = decode_costs(probe, points, ids, DecodeSettings(max_new_tokens=4, repeats=1, warmup=0, fused=False))
    assert all(p.decode_cost is not None and math.isfinite(p.decode_cost) and p.decode_cost > 0 for p in got)
    gc.collect()
    assert len(copies) == 2 and all(c() is None for c in copies)


def test_a_decode_cost_needs_split_candidates() -> None:
    with pytest.raises(ConfigError, match=r"lego\.split_cost decode measures each of lego\.split_candidates"):
        LegoConfig(model=ModelSpec(init="some/base"), lego=LegoSettings(split=2, split_cost="decode")).validate()
    LegoConfig(model=ModelSpec(init="some/base"),
               lego=LegoSettings(split_candidates=[2], split_cost="decode")).validate()

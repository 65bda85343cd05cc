"""The kv mode a LEGO model carries: chosen by `legolm lego` from its measurements at τ, saved in ``lego.json``,
and generation's default for that model unless the caller names one."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from legolm import load_pretrained
from legolm.checkpoints.native import LEGO_META, save_checkpoint, save_lego_meta
from legolm.errors import CheckpointError
from legolm.generation import GenerationConfig, generate
from legolm.generation.generate import DEFAULT_KV_MODE
from legolm.lego.report import CurveRow, choose_kv_mode
from tests.test_early_exit import lego_model, mid_threshold, prompt

TAU = 0.25


def row(kv_mode: str, decode_ppl: float, tok_per_s: float, threshold: float = TAU, if_nodes: bool = False,
        mode: str = "threshold") -> CurveRow:
    """A decode-table row with the fields the choice reads; the others are placeholders."""
    return CurveRow(label="calibrated", mode=mode, kv_mode=kv_mode, draft_tokens=0, threshold=threshold,
                    routed_ppl=30.0, hard_routed_ppl=31.0, decode_ppl=decode_ppl, eval_shallow_ratio=0.5,
                    gen_shallow_ratio=0.5, acceptance=0.0, tokens_per_round=0.0, call_cost=0.8, weight_cost=0.9,
                    tok_per_s=tok_per_s, speedup=1.0, wall_over_call=None, fused=True, if_nodes=if_nodes)


def test_skip_is_kept_where_it_is_faster_and_as_good_as_fill() -> None:
    choice = choose_kv_mode([row("fill", 80.74, 5574), row("skip", 80.77, 6991)], TAU, 0.01)  # the grown model
    assert choice is not None and choice.kv_mode == "skip"
    assert (choice.fill_ppl, choice.skip_ppl, choice.skip_tok_per_s) == (80.74, 80.77, 6991)


def test_fill_is_kept_where_skip_loses_quality_beyond_the_tolerance() -> None:
    rows = [row("fill", 34.37, 2721), row("skip", 39.91, 3007)]  # SmolLM2 split at 21 (H200, 2026-11-30)
    choice = choose_kv_mode(rows, TAU, 0.01)
    assert choice is not None and choice.kv_mode == "fill"
    assert choose_kv_mode(rows, TAU, 0.2).kv_mode == "skip"  # type: ignore[union-attr]  # a looser margin takes it


def test_fill_is_kept_where_skip_is_not_faster() -> None:
    choice = choose_kv_mode([row("fill", 50.0, 3000), row("skip", 50.0, 2900)], TAU, 0.01)
    assert choice is not None and choice.kv_mode == "fill"


def test_each_mode_counts_its_fastest_row_and_only_rows_at_tau() -> None:
    rows = [row("fill", 50.0, 3000), row("skip", 50.0, 2900), row("skip", 50.0, 3100, if_nodes=True),
            row("fill", 50.0, 9000, threshold=0.0), row("propagate", 50.0, 9000)]
    choice = choose_kv_mode(rows, TAU, 0.01)
    assert choice is not None and choice.kv_mode == "skip" and choice.fill_tok_per_s == 3000
    assert choose_kv_mode([row("fill", 50.0, 3000), row("skip", 50.0, 3100, threshold=0.5)], TAU, 0.01) is None


def test_the_kv_mode_is_saved_rewritten_and_checked(tmp_path: Path) -> None:
    model = lego_model("tiny-gpt2")
    model.meta.kv_mode = "fill"
    save_checkpoint(model, tmp_path / "m")
    weights = (tmp_path / "m" / "model.safetensors").read_bytes()
    assert load_pretrained(tmp_path / "m").meta.kv_mode == "fill"  # type: ignore[attr-defined]
    model.meta.kv_mode = "skip"
    save_lego_meta(model, tmp_path / "m")
    assert load_pretrained(tmp_path / "m").meta.kv_mode == "skip"  # type: ignore[attr-defined]
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == weights  # the weights are left alone
    meta = json.loads((tmp_path / "m" / LEGO_META).read_text())
    (tmp_path / "m" / LEGO_META).write_text(json.dumps({**meta, "kv_mode": "sideways"}))
    with pytest.raises(CheckpointError, match="kv_mode must be fill, skip or null"):
        load_pretrained(tmp_path / "m")


@pytest.mark.parametrize("fused", [False, True])
def test_generation_takes_the_models_kv_mode_unless_told(fused: bool) -> None:
    model = lego_model("tiny-pythia")
    ids = prompt()
    config = GenerationConfig(max_new_tokens=6, greedy=True, early_exit="threshold",
                              threshold=mid_threshold(model, ids), fused=fused)

    def used(cfg: GenerationConfig) -> str | None:
        stats = generate(model, ids.tolist(), cfg).early_exit
        assert stats is not None
        return stats.kv_mode

    assert model.meta.kv_mode is None and used(config) == DEFAULT_KV_MODE
    model.meta.kv_mode = "fill"
    assert used(config) == "fill"
    assert used(replace(config, kv_mode="skip")) == "skip"

"""`walk_once`: a tree walk reused until a module, parameter or buffer is registered anywhere, and the session
key of `generate` built on it (it must still change where storages move without a registration)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from legolm.core.config import ModelConfig
from legolm.generation.generate import _weights_key
from legolm.model.transformer import TransformerLM
from legolm.utils.structure import registrations, walk_once


def _walks(model: nn.Module) -> tuple[list[int], Callable[[nn.Module], int]]:
    calls: list[int] = []

    def walk(m: nn.Module) -> int:
        calls.append(1)
        return sum(1 for _ in m.modules())

    return calls, walk


def test_a_walk_is_reused_until_something_is_registered() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
    calls, walk = _walks(model)
    assert walk_once(model, walk) == walk_once(model, walk) == 3
    assert len(calls) == 1
    before = registrations()
    model[1] = nn.Sequential(nn.GELU(), nn.Identity())  # a replaced module
    assert registrations() > before
    assert walk_once(model, walk) == 5 and len(calls) == 2
    model[0].register_buffer("scale", torch.ones(1))
    walk_once(model, walk)
    model[0].weight = nn.Parameter(torch.zeros(3, 2))  # a re-assigned weight
    walk_once(model, walk)
    assert len(calls) == 4


def test_nothing_is_reused_where_conversion_replaces_parameter_objects() -> None:
    model = nn.Linear(2, 2)
    calls, walk = _walks(model)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        walk_once(model, walk)
        walk_once(model, walk)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    assert len(calls) == 2


def test_the_session_key_follows_storages_moved_without_a_registration() -> None:
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig.from_name("tiny-pythia"))
    key = _weights_key(model)
    assert _weights_key(model) == key
    model.double()  # new storages, the same parameter objects: no registration
    moved = _weights_key(model)
    assert moved != key and moved[0] == key[0]
    p = next(model.blocks[0].parameters())
    p.data = p.data.clone()
    assert _weights_key(model) != moved
    model.blocks[1] = TransformerLM(ModelConfig.from_name("tiny-pythia")).blocks[1]
    assert _weights_key(model)[0] != moved[0]

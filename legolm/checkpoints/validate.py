"""Check a state dict against a model before loading it, with messages a user can act on."""

from __future__ import annotations

from torch import Tensor, nn

from legolm.errors import CheckpointError


def check_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Raise `CheckpointError` if keys are missing or unexpected or a shape differs from the config."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), first {missing[:3]}; "
                              "is the config.json for these weights?")
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s), first {unexpected[:3]}; "
                              "is the config.json for these weights?")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"tensor {key} has shape {tuple(state[key].shape)} but the config implies "
                                  f"{shape}; the config.json does not match the weights")

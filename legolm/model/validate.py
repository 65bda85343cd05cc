"""Check a state dict against a model before loading it, with messages a user can act on.

Loaders check the weights' shapes as the file headers give them (`meta_state`: tensors on the
meta device, nothing read or allocated) against the config before any weight is read
(`legolm.model.transformer.check_shapes`), so a config that does not describe its weights is one
line, not a traceback or a huge allocation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from legolm.errors import CheckpointError

# safetensors' dtype names (a header's ``dtype``); a name not here is taken as floating point
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def meta_state(shapes: Mapping[str, Sequence[int]],
               dtypes: Mapping[str, torch.dtype] | None = None) -> dict[str, Tensor]:
    """Tensors of these shapes (and ``dtypes``, default float32) on the meta device (no memory): a state dict's
    layout without its data."""
    dtypes = dtypes or {}
    return {key: torch.empty(tuple(shape), device="meta", dtype=dtypes.get(key, torch.float32))
            for key, shape in shapes.items()}


def check_state_dict(model: nn.Module, state: dict[str, Tensor], source: str = "the config") -> None:
    """Raise `CheckpointError` if keys are missing or unexpected, a shape differs from the config, or a
    weight the model keeps in floating point is stored as integers or booleans.

    Args:
        model: The model the weights are for (on the meta device is enough).
        state: Its weights (or `meta_state` of their shapes).
        source: Where the config came from (``config.json``, ``legolm.json``, ...), named in the errors.
    """
    model_state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in model_state.items()}
    if getattr(getattr(model, "config", None), "tie_embeddings", False):
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensor(s), first {missing[:3]}; "
                              f"is {source} the config of these weights?")
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s), first {unexpected[:3]}; "
                              f"is {source} the config of these weights?")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise CheckpointError(f"tensor {key} has shape {tuple(state[key].shape)} but {source} implies "
                                  f"{shape}; {source} does not match the weights")
        if model_state[key].is_floating_point() and not state[key].is_floating_point():
            raise CheckpointError(f"tensor {key} holds {str(state[key].dtype).removeprefix('torch.')} values, not "
                                  "floating point; the checkpoint's weights must be float tensors (fp32, fp16 or "
                                  "bf16): re-export them")

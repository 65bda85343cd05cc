"""legolm's own checkpoint: ``legolm.json`` (the ModelConfig) + ``model.safetensors`` (+ tokenizer).

A `LegoLM` adds ``lego.json`` (its `LegoMeta`: split, calibrated τ, ...) and its shallow exit in
``lego/shallow_exit.safetensors`` (a subfolder: readers of the model take every top-level
``*.safetensors``), and a draft exit, where phase 3 made one, in ``lego/draft_exit.safetensors``
(``lego.json`` says so, so the module exists before its weights are read). ``model.safetensors``
holds the deep model alone, so the directory is also an ordinary checkpoint of it (what `export_hf`
writes).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file

from legolm.checkpoints.hf import export_hf_state, read_shapes, read_weights
from legolm.core.config import ModelConfig
from legolm.data.tokenizer import Tokenizer
from legolm.errors import CheckpointError, LegolmError
from legolm.model.lego import LegoLM, LegoMeta
from legolm.model.transformer import TransformerLM, check_shapes
from legolm.utils.io import atomic_dir, atomic_write_text, read_json

CONFIG_NAME = "legolm.json"
LEGO_META = "lego.json"
EXIT_WEIGHTS = "lego/shallow_exit.safetensors"
EXIT_PREFIX = "shallow_exit."
DRAFT_WEIGHTS = "lego/draft_exit.safetensors"
DRAFT_PREFIX = "draft_exit."


def _cpu_state(model: TransformerLM) -> dict:
    """The deep model's tensors on the CPU (a LEGO model's shallow and draft exits are saved apart)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
             if not k.startswith((EXIT_PREFIX, DRAFT_PREFIX))}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # the same storage as wte.weight; safetensors refuses shared tensors
    return state


def save_lego_meta(model: LegoLM, directory: str | Path) -> None:
    """(Re)write a saved LEGO model's ``lego.json`` from ``model.meta`` (atomically: temp file + rename), e.g. after
    `legolm lego` measured its kv mode; the weights are left as they are."""
    atomic_write_text(Path(directory) / LEGO_META, json.dumps(asdict(model.meta), indent=2) + "\n")


def _save_lego(model: LegoLM, directory: Path) -> None:
    save_lego_meta(model, directory)
    for head, path in ((model.shallow_exit, EXIT_WEIGHTS), (model.draft_exit, DRAFT_WEIGHTS)):
        if head is not None:
            state = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()}
            (directory / path).parent.mkdir(exist_ok=True)
            save_file(state, str(directory / path))


def _lego_meta(directory: Path) -> LegoMeta:
    try:
        meta = LegoMeta(**json.loads((directory / LEGO_META).read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise CheckpointError(f"{directory / LEGO_META} is not valid LEGO metadata ({err})") from None
    if meta.kv_mode not in (None, "fill", "skip"):
        raise CheckpointError(f"{directory / LEGO_META}: kv_mode must be fill, skip or null, got {meta.kv_mode!r}")
    return meta


def _exit_state(directory: Path, path: str = EXIT_WEIGHTS, prefix: str = EXIT_PREFIX) -> dict:
    try:
        return {prefix + k: v for k, v in load_file(str(directory / path)).items()}
    except (OSError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        what = prefix.rstrip(".").replace("_", " ")
        raise CheckpointError(f"cannot read the {what} {directory / path} ({first})") from None


def save_checkpoint(model: TransformerLM, directory: str | Path, tokenizer: Tokenizer | None = None,
                    overwrite: bool = False) -> Path:
    """Write a legolm checkpoint atomically (a temp directory renamed into place); a `LegoLM` with its exit."""
    with atomic_dir(directory, overwrite) as tmp:
        save_file(_cpu_state(model), str(tmp / "model.safetensors"))
        model.config.save(tmp / CONFIG_NAME)
        if isinstance(model, LegoLM):
            _save_lego(model, tmp)
        if tokenizer is not None:
            tokenizer.save(tmp)
    return Path(directory)


def load_checkpoint(directory: Path) -> TransformerLM:
    """A legolm checkpoint directory: a `TransformerLM`, or a `LegoLM` where ``lego.json`` is present."""
    try:
        data = read_json(directory / CONFIG_NAME)
    except LegolmError as err:
        raise CheckpointError(str(err)) from None
    config = ModelConfig.from_dict(data)
    check_shapes(config, read_shapes(directory), CONFIG_NAME)  # headers only: before any weight is read
    state = read_weights(directory)
    if not (directory / LEGO_META).is_file():
        return TransformerLM.from_state_dict(config, state)
    meta = _lego_meta(directory)
    exit_state = _exit_state(directory) if meta.split < config.n_layer else {}
    draft_state = _exit_state(directory, DRAFT_WEIGHTS, DRAFT_PREFIX) if meta.draft_exit else {}
    model = LegoLM.from_state_dict(config, {**state, **exit_state, **draft_state}, meta=meta)
    if model.shallow_exit is not None:  # as after extend: the exits frozen, lower layers frozen
        model.freeze(True)
    return model


def export_hf(model: TransformerLM, directory: str | Path, tokenizer: Tokenizer | None = None,
              overwrite: bool = False) -> Path:
    """Write a Hugging Face model directory (config.json + model.safetensors) that `transformers` loads."""
    hf_cfg, state = export_hf_state(model.config, _cpu_state(model))
    with atomic_dir(directory, overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps({**hf_cfg, "torch_dtype": str(model.wte.weight.dtype)[6:]},
                                                    indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.backend.save(str(tmp / "tokenizer.json"))
    return Path(directory)

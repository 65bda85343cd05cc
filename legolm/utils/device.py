"""Device names from flags and configs: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``; weight dtypes by name."""

from __future__ import annotations

import os
from typing import Literal

import torch

from legolm.errors import ConfigError, LegolmError

DEVICE_TYPES = ("cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DtypeName = Literal["auto", "float32", "bfloat16", "float16"]  # a config's weights dtype (auto: bf16 on GPU)


def check_device_name(name: str, what: str = "--device") -> torch.device | None:
    """``name`` as a `torch.device` (None for ``auto``); a name that is no device is one `ConfigError` line.

    Availability is not checked here (see `parse_device`), so configs can be checked on any machine.

    Args:
        name: The user's value.
        what: The flag or config key it came from (named in the error).
    """
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ConfigError(f"{what} {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps")
    return device


def parse_device(name: str, what: str = "--device") -> torch.device:
    """``name`` as a `torch.device` (``auto`` = CUDA when visible, else CPU).

    Raises:
        ConfigError: Not a device name. LegolmError: CUDA asked for but no GPU is visible.
    """
    device = check_device_name(name, what)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LegolmError(f"{what} {name} was asked for but no CUDA GPU is visible; use {what} cpu")
    return device


def device_and_dtype(device: str, dtype: DtypeName) -> tuple[str, torch.dtype]:
    """A command's ``device`` and weights ``dtype``: ``auto`` = CUDA when visible, and bf16 on a GPU, fp32 else."""
    name = str(parse_device(device, "--device"))
    return name, DTYPES[dtype if dtype != "auto" else ("bfloat16" if name.startswith("cuda") else "float32")]


def resolve_device(name: str) -> torch.device:
    """The ``run.device`` setting: ``auto`` = CUDA when visible, else CPU; a bad name or a CUDA device
    that is not there is a user error."""
    return parse_device(name, "run.device")


def planned_device(name: str) -> torch.device:
    """The kind of device a ``run.device`` setting will train on (``auto``: CUDA when visible), without checking
    that the named device exists (that is `resolve_device`'s, when the run starts)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name.split(":")[0])


def memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (host RAM for the CPU, the GPU's for CUDA); None where it is unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (AttributeError, OSError, ValueError):  # not POSIX
            return None
    return None

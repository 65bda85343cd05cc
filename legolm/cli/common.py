"""Options shared by several subcommands: model location, device and dtype."""

from __future__ import annotations

import argparse

import torch

from legolm.utils.device import parse_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_dtype(ns: argparse.Namespace) -> tuple[str, torch.dtype]:
    """Resolve ``--device auto`` (CUDA when visible) and ``--dtype auto`` (bf16 on GPU, fp32 on CPU)."""
    device = str(parse_device(ns.device, "--device"))
    dtype = ns.dtype if ns.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return device, DTYPES[dtype]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--device``, ``--dtype``."""
    p.add_argument("--model", required=True, help="legolm/Hugging Face directory, .gguf file, or hub name")
    add_device_args(p)


def add_device_args(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights dtype (auto: bf16 on GPU)")

"""``legolm`` entry point: subcommands, and user errors as one line with exit status 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch

from legolm.cli.args import add_dataclass_args, dataclass_from_args
from legolm.errors import LegolmError
from legolm.generation import GenerationConfig, generate_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device_dtype(ns: argparse.Namespace) -> tuple[str, torch.dtype]:
    device = ns.device if ns.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LegolmError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    dtype = ns.dtype if ns.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return device, DTYPES[dtype]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="legolm/Hugging Face directory, .gguf file, or hub name")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights dtype (auto: bf16 on GPU)")


def cmd_generate(ns: argparse.Namespace) -> None:
    from legolm.checkpoints.load import load_pretrained, load_tokenizer

    device, dtype = _device_dtype(ns)
    config = dataclass_from_args(GenerationConfig, ns)
    config.validate()
    if any(not p for p in ns.prompt):
        raise LegolmError("empty prompt: give --prompt some text to continue")
    model = load_pretrained(ns.model, device=device, dtype=dtype)
    tokenizer = load_tokenizer(ns.model)
    for prompt, text in zip(ns.prompt, generate_text(model, tokenizer, ns.prompt, config), strict=True):
        print(prompt + text if ns.echo else text, flush=True)


def cmd_export(ns: argparse.Namespace) -> None:
    from legolm.checkpoints.load import load_pretrained, load_tokenizer
    from legolm.checkpoints.native import export_hf, save_checkpoint

    model = load_pretrained(ns.model)
    try:
        tokenizer = load_tokenizer(ns.model)
    except LegolmError:
        tokenizer = None
    save = export_hf if ns.format == "hf" else save_checkpoint
    out = save(model, ns.out, tokenizer, overwrite=ns.overwrite)
    print(f"wrote {ns.format} checkpoint to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="legolm", description="Small language models, built from bricks.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt with a pretrained model")
    _add_model_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for a batch)")
    gen.add_argument("--echo", action=argparse.BooleanOptionalAction, default=False, help="print the prompt too")
    add_dataclass_args(gen, GenerationConfig)
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", help="convert a checkpoint to Hugging Face or legolm format")
    exp.add_argument("--model", required=True, help="legolm/Hugging Face directory, .gguf file, or hub name")
    exp.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    exp.add_argument("--format", choices=["hf", "legolm"], default="hf")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    exp.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = ns.func
    try:
        func(ns)
    except LegolmError as err:
        print(f"legolm: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("legolm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

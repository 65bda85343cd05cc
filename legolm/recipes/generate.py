"""The ``legolm generate`` job: continue prompts with a pretrained model, print the continuations.

A LEGO model (the ``model/`` directory of ``legolm lego``) also decodes through its exits
(``early_exit``); one stats line follows the text then (shallow ratio or acceptance, cost against
full depth, tok/s).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from legolm.checkpoints.loader import load
from legolm.errors import ConfigError
from legolm.generation import GenerationConfig, complete
from legolm.utils.device import DtypeName, device_and_dtype


@dataclass
class GenerateConfig(GenerationConfig):
    """``legolm generate``: the model, the prompts, and how to continue them (the `GenerationConfig` settings).

    Attributes:
        model: The model: a legolm/Hugging Face directory, .gguf file, or hub name.
        prompt: Texts to continue, one row of the batch each (repeat --prompt for a batch).
        echo: Print each prompt before its continuation.
        device: cpu, cuda, cuda:N or auto (CUDA when visible).
        dtype: Weights dtype (auto: bf16 on a GPU, fp32 on the CPU).
    """

    model: str = ""
    prompt: list[str] = field(default_factory=list)
    echo: bool = False
    device: str = "auto"
    dtype: DtypeName = "auto"

    def validate(self) -> None:
        """Raise `ConfigError` naming the first missing or bad setting."""
        if not self.model:
            raise ConfigError("give --model (a legolm/Hugging Face directory, .gguf file or hub name)")
        if not self.prompt:
            raise ConfigError("give --prompt TEXT (repeat it for a batch)")
        super().validate()
        if any(not p for p in self.prompt):
            raise ConfigError("empty prompt: give --prompt some text to continue")


def run(cfg: GenerateConfig) -> list[str]:
    """Load the model and its tokenizer, continue every prompt, print each; return the continuations."""
    cfg.validate()
    device, dtype = device_and_dtype(cfg.device, cfg.dtype)
    model, tokenizer = load(cfg.model, device=device, dtype=dtype)
    texts, result = complete(model, tokenizer, cfg.prompt, cfg)
    for prompt, text in zip(cfg.prompt, texts, strict=True):
        print(prompt + text if cfg.echo else text, flush=True)
    if result.early_exit is not None:
        print(result.early_exit.line(sum(len(row) for row in result.tokens)), flush=True)
    return texts

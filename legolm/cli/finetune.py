"""``legolm finetune``: LoRA or full fine-tuning of a pretrained model on real text, through `fit`.

    legolm finetune --method lora --model SmolLM2-135M-Instruct.Q4_1.gguf --data tinyshakespeare \\
        --lora.target-modules q_proj v_proj --lora.r 8 --run.out-dir runs/smollm2-shakespeare
    legolm finetune --config configs/finetune-lora-smollm2-shakespeare.yaml [--overwrite | --resume]
    legolm finetune --method skip2lora --model M --data tinyshakespeare --skip2lora.block-indices 27 28 29

Every setting is a `FinetuneConfig` key (``--print-config`` shows them all). The same loop,
checkpoints, progress, metrics and evaluation as ``legolm pretrain``; in addition the held-out
sliding-window perplexity is measured before and after training with the same windows. The run
directory gets ``adapter/`` (peft format: ``peft.PeftModel.from_pretrained`` loads it), ``model/``
(the merged model with ``--save-merged``, or the fully fine-tuned one) and ``summary.json``.
"""

from __future__ import annotations

import argparse

from legolm.cli.args import add_config_args, printed_config, resolve_run_config
from legolm.recipes.finetune import FinetuneConfig

ALIASES = {"--overwrite": "run.overwrite", "--resume": "run.resume", "--data": "data.source"}


def run(ns: argparse.Namespace) -> None:
    cfg = resolve_run_config(FinetuneConfig, ns)
    if printed_config(ns, cfg):
        return
    from legolm.recipes import finetune

    finetune.run(cfg)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="LoRA or full fine-tuning of a pretrained model on real text",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       allow_abbrev=False)
    add_config_args(p, FinetuneConfig, ALIASES)
    p.set_defaults(func=run)

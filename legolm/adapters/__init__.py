"""Parameter-efficient adapters: LoRA layers, their injection, peft-format files and reports.

    cfg = LoRAConfig(r=8, alpha=16, target_modules=["c_attn", "c_proj"])
    names = inject_lora(model, cfg)             # base frozen, adapters trainable
    print(trainable_report(model).format())
    save_adapter(model, "runs/adapter", cfg)    # peft format
    merge_and_unload(model)                     # a plain TransformerLM again
"""

from legolm.adapters.base import AdapterLayer, adapter_layers, adapter_parameters
from legolm.adapters.inject import (
    LoRAConfig,
    inject_lora,
    merge_adapters,
    merge_and_unload,
    unload,
    unmerge_adapters,
)
from legolm.adapters.lora import LoRALinear
from legolm.adapters.peft_io import load_adapter, read_adapter_config, save_adapter
from legolm.adapters.report import TrainableReport, trainable_report

__all__ = [
    "AdapterLayer",
    "LoRAConfig",
    "LoRALinear",
    "TrainableReport",
    "adapter_layers",
    "adapter_parameters",
    "inject_lora",
    "load_adapter",
    "merge_adapters",
    "merge_and_unload",
    "read_adapter_config",
    "save_adapter",
    "trainable_report",
    "unload",
    "unmerge_adapters",
]

"""Every shipped config file loads into its command's config dataclass and passes its checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from legolm.config import config_from_dict, load_yaml, merge
from legolm.experiment.config import ExperimentConfig
from legolm.lct.train import LCTConfig
from legolm.lego.config import LegoConfig
from legolm.recipes.finetune import FinetuneConfig
from legolm.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMANDS: dict[str, type[Any]] = {"pretrain-": TrainConfig, "finetune-": FinetuneConfig,
                                  "skip2lora-vs-lora-": FinetuneConfig, "lego-": LegoConfig, "lct-": LCTConfig,
                                  "experiment-": ExperimentConfig}
GRIDS = "skip2lora-search-"  # benchmarks.skip2lora_search grids: a base config plus runs
FROM_CLI = {"lego-split-tiny.yaml": {"model": {"init": "CHECKPOINT"}},  # what the file's header says to add
            "lego-split-joint-cpu.yaml": {"model": {"init": "CHECKPOINT"}}}


def command_of(path: Path) -> type[Any] | None:
    return next((cls for prefix, cls in COMMANDS.items() if path.name.startswith(prefix)), None)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_config_file_loads_into_its_commands_config(path: Path) -> None:
    data = load_yaml(path)
    if path.name.startswith(GRIDS):
        assert command_of(CONFIGS / Path(data["base"]).name) is FinetuneConfig and data["runs"]
        return
    cls = command_of(path)
    assert cls is not None, f"{path.name}: no command known for this file name (add its prefix to COMMANDS)"
    cfg = config_from_dict(cls, merge(data, FROM_CLI.get(path.name, {})))
    if hasattr(cfg, "validate"):
        cfg.validate()

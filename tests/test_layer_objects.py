"""Layer objects as bricks: ``TransformerLM(config, layers=[...])`` with names, builders and module
instances equals the registry path; an unregistered layer class drops in, trains, saves, and a config
that cannot rebuild it says so in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from legolm.checkpoints.loader import load_pretrained
from legolm.checkpoints.native import save_checkpoint
from legolm.cli.main import main
from legolm.core.config import ModelConfig
from legolm.core.context import LayerContext
from legolm.core.kv_cache import KVStore
from legolm.errors import ConfigError, LegolmError
from legolm.layers import build_layer, hierarchical, infini, pythia
from legolm.layers.norms import make_norm
from legolm.model.factory import model_config
from legolm.model.transformer import TransformerLM

NAMES = ["infini", "pythia", "hierarchical"]


def _config() -> ModelConfig:
    return model_config(layers=NAMES, base="tiny-pythia", extra={"infini": {"segment_len": 8},
                                                                 "hierarchical": {"segment_len": 8, "num_memories": 3}})


def _ids() -> Tensor:
    return torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))


def test_builders_give_the_named_model_bit_for_bit() -> None:
    """The registered types' own builders, called where the names would be: same config, same weights."""
    cfg = _config()
    torch.manual_seed(0)
    named = TransformerLM(cfg).eval()
    torch.manual_seed(0)
    built = TransformerLM(cfg, layers=[infini.build, pythia.build, hierarchical.build]).eval()
    assert built.config == named.config and built.config.layers == NAMES
    a, b = named.state_dict(), built.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(built(_ids()), named(_ids()))
    mixed = TransformerLM(cfg, layers=["infini", pythia.build, "hierarchical"])
    assert mixed.config.layers == NAMES


def test_a_hand_built_stack_of_instances_equals_the_named_one() -> None:
    cfg = _config()
    named = TransformerLM(cfg).eval()
    blocks = [build_layer(name, cfg, i) for i, name in enumerate(NAMES)]
    built = TransformerLM(cfg, layers=blocks).eval()
    assert all(built.blocks[i] is blocks[i] for i in range(3))
    assert built.config.layers == ["custom:MemoryBlock", "custom:ParallelBlock", "custom:MemoryBlock"]
    built.load_state_dict(named.state_dict())  # strict: the same tensors under the same names and shapes
    assert torch.equal(built(_ids()), named(_ids()))


class GatedMLPBlock(nn.Module):
    """A new layer a researcher writes: x + sigmoid(g) * W2 gelu(W1 norm(x)), no attention, not registered."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = make_norm(config)
        self.up, self.down = nn.Linear(config.n_embd, 2 * config.n_embd), nn.Linear(2 * config.n_embd, config.n_embd)
        self.gate = nn.Parameter(torch.zeros(config.n_embd))

    def forward(self, x: Tensor, ctx: LayerContext, cache: KVStore | None = None) -> Tensor:
        return x + torch.sigmoid(self.gate) * self.down(nn.functional.gelu(self.up(self.norm(x))))


def test_an_unregistered_layer_class_drops_in_trains_and_saves(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ModelConfig.from_name("tiny-pythia")
    torch.manual_seed(0)
    model = TransformerLM(cfg, layers=["pythia", GatedMLPBlock(cfg), lambda c, i: GatedMLPBlock(c)])
    assert model.config.layers == ["pythia", "custom:GatedMLPBlock", "custom:<lambda>"]
    assert model.config.n_layer == 3 and len(model.blocks) == 3
    ids = _ids()
    loss = nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    block = model.blocks[1]
    assert isinstance(block, GatedMLPBlock) and block.up.weight.grad is not None and block.gate.grad is not None
    assert block.up.weight.grad.abs().sum() > 0

    save_checkpoint(model, tmp_path / "ckpt")  # the config describes it, the weights are all there
    with pytest.raises(ConfigError, match="unregistered layer object"):
        load_pretrained(tmp_path / "ckpt")
    code = main(["eval", "ppl", "--model", str(tmp_path / "ckpt"), "--data", "tinyshakespeare", "--tokenizer", "gpt2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "custom:GatedMLPBlock" in err[0] and "layers=[...]" in err[0]
    again = TransformerLM(cfg, layers=[pythia.build, GatedMLPBlock(cfg), GatedMLPBlock(cfg)])
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(ids), model(ids))


@pytest.mark.parametrize(("layers", "fragment"), [
    ([3, "pythia"], "layers[0] is a int"),
    (["pythia", "transformer"], "unknown layer type(s) ['transformer']"),
    (["custom:"], "unknown layer type(s) ['custom:']"),
])
def test_bad_layer_entries_are_one_clear_error(layers: list[object], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        TransformerLM(ModelConfig.from_name("tiny-pythia"), layers=layers)  # type: ignore[arg-type]
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_one_instance_twice_and_objects_in_the_config_are_refused() -> None:
    cfg = ModelConfig.from_name("tiny-pythia")
    block = pythia.build(cfg, 0)
    with pytest.raises(ConfigError, match="appears twice"):
        TransformerLM(cfg, layers=[block, block])
    with pytest.raises(LegolmError, match="holds type names, not ParallelBlock objects"):
        ModelConfig.from_name("tiny-pythia", layers=[block])


def test_from_state_dict_builds_the_rope_tables_where_the_weights_are() -> None:
    """Weights on another device (here meta, on the GPU cuda) must bring the RoPE tables along: positions index
    them on the weights' device (a CPU table under cuda weights failed the GPU decode benchmark)."""
    config = ModelConfig.from_name("tiny-llama")
    with torch.device("meta"):
        state = TransformerLM(config).state_dict()
    model = TransformerLM.from_state_dict(config, state)
    assert model.rope.device.type == "meta"
    assert model.wte.weight.device.type == "meta"

"""The benchmarks' peers (benchmarks/peers.py): litgpt holds legolm's weights through litgpt's own converter.

litgpt is no dependency of legolm. These tests use it where it imports, or install it for this test
session into a temporary folder from the wheels in the git-ignored ``.whl/`` (the GPU recipe's
wheels, see the README's Benchmarks); without either they are skipped ("litgpt wheels not in
.whl"). The import guard itself (a missing peer is a "not installed" row) is tested always.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.peers import LITGPT, litgpt_unsupported, missing
from legolm.checkpoints.hf import convert_state, export_hf_state, family_for
from legolm.core.config import ModelConfig
from legolm.model.transformer import TransformerLM

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
NEEDS = {"litgpt": "litgpt", "lightning": "lightning", "lightning_utilities": "lightning_utilities",
         "torchmetrics": "torchmetrics"}  # import name -> wheel name prefix


@pytest.fixture(scope="session")
def litgpt_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder to put on sys.path / PYTHONPATH for litgpt ("" when it imports already)."""
    if missing(LITGPT) is None:
        return ""
    wheels = []
    for module, prefix in NEEDS.items():
        found = sorted(WHEELS.glob(f"{prefix}-*.whl"))
        if not found:
            if module == "litgpt" or missing(module) is not None:
                pytest.skip("litgpt wheels not in .whl")
            continue
        wheels.append(str(found[-1]))
    target = tmp_path_factory.mktemp("litgpt_site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), *wheels], check=True, capture_output=True, timeout=600)
    sys.path.insert(0, str(target))
    why = missing(LITGPT)
    if why:
        pytest.skip(f"litgpt from .whl does not import here: {why}")
    return str(target)


def hf_pythia(preset: str = "tiny-pythia", scale: float = 0.3) -> tuple[ModelConfig, torch.nn.Module]:
    """A transformers GPT-NeoX of the preset's shape with large random weights (so a wrong layout shows)."""
    import transformers

    config = ModelConfig.from_name(preset)
    hf_cfg, _ = export_hf_state(config, TransformerLM(config).state_dict())
    family = family_for(hf_cfg["model_type"])
    cfg = transformers.AutoConfig.for_model(hf_cfg.pop("model_type"), **hf_cfg)
    torch.manual_seed(0)
    hf = getattr(transformers, family.architecture)(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + scale * torch.randn_like(p) if "layernorm" in name or "layer_norm" in name
                    else scale * torch.randn_like(p))
    return config, hf


def legolm_of(config: ModelConfig, hf: torch.nn.Module) -> TransformerLM:
    state = convert_state({k: v.clone() for k, v in hf.state_dict().items()}, family_for("gpt_neox"), config,
                          to_hf=False)
    return TransformerLM.from_state_dict(config, state).eval()


def test_a_missing_peer_reads_not_installed_and_gpt2_is_not_litgpts() -> None:
    assert missing("no_such_peer_library") == "not installed"
    assert missing("torch") is None
    assert "no GPT-2" in (litgpt_unsupported(ModelConfig.from_name("tiny-gpt2")) or "")
    assert litgpt_unsupported(ModelConfig.from_name("tiny-pythia")) is None


def test_litgpt_converted_by_its_own_converter_gives_legolms_logits(litgpt_path: str) -> None:
    from benchmarks.peers import litgpt_model

    config, hf = hf_pythia()
    ours = legolm_of(config, hf)
    theirs = litgpt_model({k: v.clone() for k, v in hf.state_dict().items()}, config).eval()
    x = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, ref = ours(x), theirs(x), hf(input_ids=x).logits
    assert a.abs().max() > 1  # logits far from flat: a wrong q/k/v or rotary layout would show
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, ref, atol=1e-4, rtol=1e-4)


def test_litgpt_lora_holding_pefts_adapters_gives_pefts_logits(litgpt_path: str) -> None:
    """Started from peft's A and B (B random here, zero in the benchmark) litgpt's LoRA model computes peft's."""
    import peft

    from benchmarks.peers import copy_peft_lora, litgpt_model
    from legolm.adapters import LoRAConfig

    config, hf = hf_pythia()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    cfg = LoRAConfig(r=4, alpha=8.0, target_modules=["query_key_value", "dense"])
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=cfg.target_modules)).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    lit = litgpt_model(state, config, cfg).eval()
    copy_peft_lora(lit, theirs)
    x = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = theirs(input_ids=x).logits
        with theirs.disable_adapter():
            plain = theirs(input_ids=x).logits
        got = lit(x)
    assert (ref - plain).abs().max() > 0.1  # the adapters change the logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    n_lit = sum(p.numel() for p in lit.parameters() if p.requires_grad)
    per_layer_qkv_a = 2 * 4 * config.n_embd  # litgpt's extra A for k and v
    assert n_lit == theirs.get_nb_trainable_parameters()[0] + config.n_layer * per_layer_qkv_a


def test_litgpt_greedy_decoding_gives_legolms_tokens(litgpt_path: str) -> None:
    from benchmarks.peers import LitgptDecoder, litgpt_model
    from legolm.generation import GenerationConfig, generate

    config, hf = hf_pythia(scale=0.1)
    ours = legolm_of(config, hf)
    lit = litgpt_model({k: v.clone() for k, v in hf.state_dict().items()}, config).eval()
    prompts = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    want = generate(ours, prompts.tolist(), GenerationConfig(max_new_tokens=9, greedy=True, stop_at_eos=False))
    assert LitgptDecoder(lit, 7, 9, 1, compile=False)(prompts[:1]) == want.tokens[:1]
    lit.clear_kv_cache()
    assert LitgptDecoder(lit, 7, 9, 2, compile=False)(prompts) == want.tokens


@pytest.mark.parametrize("argv", [["benchmarks.pretrain", "--models", "pythia-160m"],
                                  ["benchmarks.lora", "--model", "pythia-160m"],
                                  ["benchmarks.skip2lora", "--model", "pythia-160m", "--graph-step"],
                                  ["benchmarks.decode", "--models", "pythia-160m"]])
def test_benchmark_smoke_runs_have_the_peer_rows(argv: list[str], litgpt_path: str) -> None:
    """Each benchmark's --smoke (CPU, tiny Pythia) runs its litgpt and compiled-peft rows to a figure."""
    if not (ROOT / ".bench" / "tinystories_pythia.npy").is_file():
        pytest.skip("no .bench token arrays (python -m benchmarks.prepare_data)")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), litgpt_path, os.environ.get("PYTHONPATH", "")] if p)}
    proc = subprocess.run([sys.executable, "-m", *argv, "--smoke"], capture_output=True, text=True, timeout=900,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith("| tiny-pythia") or line.startswith(("| peft", "| litgpt"))]
    names = {next(c for c in r if c.startswith(("hf", "peft", "litgpt", "legolm"))): r for r in rows}
    litgpt = [n for n in names if n.startswith("litgpt")]
    assert litgpt, proc.stdout[-3000:]
    for n in litgpt:  # a figure, not a note
        assert not any("not installed" in c or "failed" in c for c in names[n]), names[n]
    if argv[0] in ("benchmarks.lora", "benchmarks.skip2lora"):
        assert any(n.startswith("peft") and "compile" in n for n in names), sorted(names)
    if "--graph-step" in argv:  # one whole-step graph row per mode (eager steps off the GPU)
        graphs = [line for line in proc.stdout.splitlines() if "one CUDA graph per step" in line]
        assert len(graphs) == 2 and "(compiled)" in graphs[1] and "(compiled)" not in graphs[0], graphs

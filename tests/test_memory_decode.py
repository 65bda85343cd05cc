"""Decoding memory-layer models token by token (`legolm.generation.memory_decode`): the logits of one
full forward pass, the carried memory of one carried call, `generate` and `legolm generate` on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from legolm.checkpoints.native import save_checkpoint
from legolm.cli.main import main
from legolm.core.kv_cache import KVCache
from legolm.data.tokenizer import train_bpe
from legolm.errors import ConfigError
from legolm.generation import GenerationConfig, generate
from legolm.generation.memory_decode import MemoryDecoder
from legolm.layers.memory_state import carry_memory, get_memory_state, reset_memory, set_memory_state
from legolm.model.factory import create_model
from legolm.model.transformer import TransformerLM

SEG = 8
VOCAB = 512
KINDS = {
    "infini": {"num_memory_banks": 2, "segments_per_bank": 1},
    "multi_memory": {"num_memories": 2},
    "hierarchical": {"num_memories": 3, "coarse_every": 2},
}


def memory_model(kind: str, seed: int = 0) -> TransformerLM:
    """A 2-layer model (the memory layer, then Pythia) with weights spread wide enough that greedy
    argmaxes have no near-ties and the memory matters."""
    torch.manual_seed(seed)
    model = create_model(kind, num_layers=2, base="tiny-pythia", segment_len=SEG, **KINDS[kind]).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5)
    return model


def _greedy_by_full_forwards(model: TransformerLM, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("kind", list(KINDS))
def test_token_by_token_logits_and_memory_equal_one_long_call(kind: str) -> None:
    """Prompt (not a segment multiple), then one token per call across 5 segment boundaries: every logit
    equals the full forward pass, and the memory left equals a carried call over the whole sequence."""
    model = memory_model(kind)
    seq = torch.randint(0, VOCAB, (1, 5 * SEG + 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq)[0]
        dec = MemoryDecoder(model, seq.shape[1])
        logits = [dec.feed(seq[:, :5])[0]] + [dec.feed(seq[:, t:t + 1])[0] for t in range(5, seq.shape[1])]
        reset_memory(model)
        with carry_memory(model):
            model(seq)
    torch.testing.assert_close(torch.stack(logits[:-1]), full[4:-1], atol=1e-4, rtol=1e-4)
    want, got = get_memory_state(model), dec.memory_state()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_generate_equals_greedy_full_forwards(kind: str) -> None:
    model = memory_model(kind)
    prompt = torch.randint(0, VOCAB, (13,), generator=torch.Generator().manual_seed(2)).tolist()
    res = generate(model, [prompt, prompt[:4]], GenerationConfig(max_new_tokens=3 * SEG, greedy=True,
                                                                  stop_at_eos=False))
    assert res.tokens[0] == _greedy_by_full_forwards(model, prompt, 3 * SEG)
    assert res.tokens[1] == _greedy_by_full_forwards(model, prompt[:4], 3 * SEG)


def test_generate_continues_and_updates_the_carried_memory() -> None:
    """Inside carry_memory, generate starts from the carried memory and leaves the memory of prompt +
    continuation, as a carried forward call over them would."""
    model = memory_model("infini")
    history = torch.randint(0, VOCAB, (1, 2 * SEG), generator=torch.Generator().manual_seed(3))
    prompt = [5, 6, 7]
    with torch.no_grad(), carry_memory(model):
        model(history)
        start = get_memory_state(model)
        new = generate(model, [prompt], GenerationConfig(max_new_tokens=6, greedy=True, stop_at_eos=False)).tokens[0]
        after = get_memory_state(model)
        set_memory_state(model, start)
        next_logits = model(torch.tensor([prompt + new[:-1]]))[0, -1]
        model(torch.tensor([[new[-1]]]))  # ... and the last token: the sequence is prompt + new
    assert new[-1] == int(next_logits.argmax())
    reset_memory(model)
    with torch.no_grad(), carry_memory(model):
        model(history)
        model(torch.tensor([prompt + new]))
        want = get_memory_state(model)
    for name in want:
        torch.testing.assert_close(after[name], want[name], atol=1e-4, rtol=1e-4)
    without = generate(model, [prompt], GenerationConfig(max_new_tokens=6, greedy=True, stop_at_eos=False)).tokens[0]
    assert without == _greedy_by_full_forwards(model, prompt, 6), "outside carry_memory: empty memory"


def test_the_kv_cache_is_still_refused_and_bad_settings_are_one_line() -> None:
    model = memory_model("infini")
    cache = KVCache(model.config, 1, 8)
    with pytest.raises(ConfigError, match="cannot run with a KV cache"):
        model(torch.tensor([[1, 2]]), cache=cache, input_pos=torch.arange(2))
    with pytest.raises(ConfigError, match="drop --fused"):
        generate(model, [[1, 2]], GenerationConfig(max_new_tokens=2, greedy=True, fused=True))
    with pytest.raises(ConfigError, match="one sequence"), carry_memory(model):
        generate(model, [[1, 2], [3, 4]], GenerationConfig(max_new_tokens=2, greedy=True))


def test_legolm_generate_decodes_a_memory_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command that failed with 'cannot run with a KV cache' prints the greedy continuation."""
    tok = train_bpe(["the cat sat on the mat. " * 20, "a dog ran in the park. " * 20], 300)
    torch.manual_seed(0)
    model = create_model("multi_memory", num_layers=2, base="tiny-pythia", segment_len=SEG, vocab_size=300,
                         num_memories=2).eval()
    save_checkpoint(model, tmp_path / "model", tokenizer=tok)
    code = main(["generate", "--model", str(tmp_path / "model"), "--prompt", "the cat sat", "--greedy",
                 "--max-new-tokens", str(2 * SEG), "--no-stop-at-eos", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    ids = tok.encode("the cat sat")
    assert out == tok.decode(_greedy_by_full_forwards(model, ids, 2 * SEG)) + "\n"

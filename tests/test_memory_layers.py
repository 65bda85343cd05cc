"""Memory layers (infini, multi_memory, hierarchical): hand-checked memory math, causality,
segment-wise equivalences, sizes, bf16 stability, option errors, refused KV-cached decoding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from legolm.core.context import LayerContext
from legolm.core.kv_cache import KVCache
from legolm.data.tokenizer import Tokenizer
from legolm.errors import ConfigError
from legolm.generation import GenerationConfig, generate
from legolm.layers.hierarchical import HierarchicalMemory, folded_levels
from legolm.layers.infini import BankedMemory
from legolm.layers.memory import MemoryAttention, elu_plus_one, memory_read, memory_write
from legolm.layers.memory_state import (
    carry_memory,
    get_memory_state,
    memory_state_nbytes,
    reset_memory,
    save_memory_state,
)
from legolm.model.factory import create_model, model_config
from legolm.model.transformer import TransformerLM

MEMORY_KINDS = ["infini", "multi_memory", "hierarchical"]
# Options that make every kind use more than one memory slot within a few segments.
SLOT_OPTIONS = {"infini": {"num_memory_banks": 2, "segments_per_bank": 1}, "multi_memory": {"num_memories": 3},
                "hierarchical": {"coarse_every": 2, "num_memories": 3}}
SEG = 8
LN_HALF = math.log(0.5)  # σ(ln 0.5) = exp(ln 0.5) = 0.5: inputs below with round σ values


def _tiny(kind: str, layers: list[str] | None = None, seed: int = 0, **options: object) -> TransformerLM:
    torch.manual_seed(seed)
    opts = {"segment_len": SEG, **SLOT_OPTIONS.get(kind, {}), **options} if kind != "pythia" else options
    model = create_model(kind, layers=layers, num_layers=2, base="tiny-pythia", **opts).eval()
    with torch.no_grad():  # larger weights than the 0.02 init, so differences are not lost in rounding
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    return model


# -- the memory math by hand -------------------------------------------------------------------------
def test_sigma_is_elu_plus_one() -> None:
    x = torch.tensor([LN_HALF, 0.0, 1.0, 3.0])
    torch.testing.assert_close(elu_plus_one(x), torch.tensor([0.5, 1.0, 2.0, 4.0]))


def test_memory_update_and_read_by_hand() -> None:
    """Two keys/values into one 2x2 memory, linear and delta rule, values worked out on paper.

    After token 0 (σk = [1, 2], v = [0, 1]):  M = [[0, 1], [0, 2]], z = [1, 2].
    Token 1 (σk = [0.5, 1], v = [1, 0]): the memory returns σk M / σk z = [0, 2.5] / 2.5 = [0, 1].
      linear: M += [[0.5, 0], [1, 0]]                   -> [[0.5, 1], [1, 2]]
      delta:  M += σkᵀ (v - [0, 1]) = [[0.5, -0.5], [1, -1]] -> [[0.5, 0.5], [1, 1]]
      both:   z = [1.5, 3]
    Read with σq = [1, 1]: linear [1.5, 3] / 4.5 = [1/3, 2/3]; delta [1.5, 1.5] / 4.5 = [1/3, 1/3].
    """
    M0, z0 = torch.zeros(2, 2), torch.zeros(2)
    sk0, v0 = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]])
    sk1, v1 = torch.tensor([[0.5, 1.0]]), torch.tensor([[1.0, 0.0]])
    for delta in (False, True):  # the first write into an empty memory is the same for both rules
        M1, z1 = memory_write(sk0, v0, M0, z0, delta, 1e-6)
        torch.testing.assert_close(M1, torch.tensor([[0.0, 1.0], [0.0, 2.0]]))
        torch.testing.assert_close(z1, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(memory_read(sk1, M1, z1, 1e-6), torch.tensor([[0.0, 1.0]]))
    M_lin, z_lin = memory_write(sk1, v1, M1, z1, False, 1e-6)
    M_del, z_del = memory_write(sk1, v1, M1, z1, True, 1e-6)
    torch.testing.assert_close(M_lin, torch.tensor([[0.5, 1.0], [1.0, 2.0]]))
    torch.testing.assert_close(M_del, torch.tensor([[0.5, 0.5], [1.0, 1.0]]))
    torch.testing.assert_close(z_lin, torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(z_del, torch.tensor([1.5, 3.0]))
    sq = torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(memory_read(sq, M_lin, z_lin, 1e-6), torch.tensor([[1 / 3, 2 / 3]]))
    torch.testing.assert_close(memory_read(sq, M_del, z_del, 1e-6), torch.tensor([[1 / 3, 1 / 3]]))


def test_empty_memory_reads_zero() -> None:
    out = memory_read(torch.tensor([[2.0, 3.0]]), torch.zeros(2, 4), torch.zeros(2), 1e-6)
    assert torch.equal(out, torch.zeros(1, 4))


def _identity_attention() -> MemoryAttention:
    """C = 2, one local head and one memory head of width 2, q = k = v = x, output projection = I."""
    def linear(n_out: int) -> nn.Linear:
        layer = nn.Linear(2, n_out, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.eye(2).repeat(n_out // 2, 1))
        return layer

    memory = BankedMemory(num_banks=1, segments_per_bank=1, delta=True, eps=1e-6)
    return MemoryAttention(linear(6), linear(6), linear(2), memory, n_head=1, head_dim=2, memory_heads=1,
                           segment_len=1, layer_type="infini")


def test_infini_layer_output_by_hand() -> None:
    """Segments of one token: local attention returns the token's own v; β = 0 mixes half and half.

    x0 = [0, 1]: memory empty -> out0 = 0.5·x0 = [0, 0.5].
    x1 = [ln .5, 0]: σq = [0.5, 1], M = σk0ᵀ v0 = [[0, 1], [0, 2]], z = [1, 2]:
        A_mem = [0, 2.5] / 2.5 = [0, 1];  out1 = 0.5·x1 + 0.5·[0, 1] = [0.5 ln .5, 0.5].
    """
    attn = _identity_attention()
    x = torch.tensor([[[0.0, 1.0], [LN_HALF, 0.0]]])
    out = attn(x, LayerContext(None, None, None, None))
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.5], [0.5 * LN_HALF, 0.5]]]))


# -- hierarchical levels ------------------------------------------------------------------------------
def test_hierarchical_levels_fold_by_hand() -> None:
    """Three levels, coarse_every 2, linear rule, σ(k) = 1 (k = 0), segment s writes v = s + 1 on L tokens.

    Each segment adds L·(s+1) to every entry of M and L to every entry of z of level 0. Folds: after
    s1 (2 written) level 0 -> 1; after s3 (4 = 2²) levels 0, 1 -> 2; after s5 level 0 -> 1. After s6:
    level 0 = s6 (7), level 1 = s4 + s5 (5 + 6 = 11), level 2 = s0..s3 (1 + 2 + 3 + 4 = 10).
    """
    assert [folded_levels(s, 2, 3) for s in range(8)] == [0, 1, 0, 2, 0, 1, 0, 2]  # capped at the top level
    assert [folded_levels(s, 4, 2) for s in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]  # the two-level layer
    L = 3
    memory = HierarchicalMemory(heads=1, head_dim=2, levels=3, coarse_every=2, delta=False, eps=1e-6)
    state = memory.init_state(1, 1, 2, 2, "cpu")
    for s in range(7):
        state = memory.write(torch.zeros(1, 1, L, 2), torch.full((1, 1, L, 2), s + 1.0), state, s)
    torch.testing.assert_close(state["M"][0, :, 0], torch.tensor([7.0, 11.0, 10.0])[:, None, None] * L
                               * torch.ones(3, 2, 2))
    torch.testing.assert_close(state["z"][0, :, 0], torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]) * L)


def test_hierarchical_read_mixes_levels_by_stick_breaking() -> None:
    """Gate logits b0 = 0, b1 = ln 3 (g0 = 1/2, g1 = 3/4): weights 1/2, 1/2·3/4 = 3/8, 1/2·1/4 = 1/8.

    With σ(q) = 1, z = 1 and M = c·1 every level reads c (2c / 2), so A = 0.5·1 + 0.375·10 + 0.125·100.
    """
    memory = HierarchicalMemory(heads=1, head_dim=2, levels=3, coarse_every=2, delta=False, eps=1e-6)
    assert memory.level_gate_bias is not None
    with torch.no_grad():
        memory.level_gate_bias.fill_(math.log(3.0))
    state = memory.init_state(1, 1, 2, 2, "cpu")
    state["M"] = torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1, 1).expand(1, 3, 1, 2, 2).clone()
    state["z"] = torch.ones(1, 3, 1, 2)
    read = memory.read(torch.zeros(1, 1, 4, 2), state, 5)
    torch.testing.assert_close(read, torch.full((1, 1, 4, 2), 0.5 + 3.75 + 12.5))


def test_hierarchical_with_four_memories_trains_and_saves_the_documented_state(tmp_path: Path) -> None:
    """The guidelines' layer: 4 memories, 8 memory heads of 64 (width 512), linear rule. One training step
    reaches every expansion gate; the saved state is 4·(8·64·64·4 + 8·64·4) + 8 = 532,488 bytes (~540 KB)."""
    with torch.device("meta"):  # the guidelines' own call, at the default sizes
        assert "hierarchical" in create_model("hierarchical", num_memories=4, use_delta_rule=False).config.extra
    torch.manual_seed(0)
    model = create_model("hierarchical", num_memories=4, memory_heads=8, use_delta_rule=False, coarse_every=2,
                         segment_len=SEG, num_layers=1, n_embd=512, n_head=8, intermediate_size=512, vocab_size=512)
    memory = model.blocks[0].attn.memory
    assert isinstance(memory, HierarchicalMemory) and memory.slots == 4
    x = torch.randint(0, 512, (2, 10 * SEG + 1))  # 10 segments: level 3 is written after 2³ = 8 and read after
    loss = nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert math.isfinite(loss.item())
    assert memory.gate_weight.grad is not None and memory.gate_weight.grad.abs().sum() > 0
    assert memory.level_gate_weight is not None and memory.level_gate_weight.grad is not None
    assert all(memory.level_gate_weight.grad[i].abs().sum() > 0 for i in range(2)), "a level gate got no gradient"
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert memory_state_nbytes(model) == 4 * (8 * 64 * 64 * 4 + 8 * 64 * 4) + 8 == 532_488
    reset_memory(model)
    with torch.no_grad(), carry_memory(model):
        model(x[:1, : 4 * SEG])  # one sequence: the state per sequence
    saved = save_memory_state(model, tmp_path / "doc.memory.safetensors")
    assert saved.tensor_bytes == 532_488 and saved.tensor_bytes < saved.file_bytes < saved.tensor_bytes + 2048
    state = get_memory_state(model)
    assert state["blocks.0.attn.M"].shape == (1, 4, 8, 64, 64)
    assert state["blocks.0.attn.M"][:, 0].abs().sum() == 0 < state["blocks.0.attn.M"][:, 2].abs().sum()  # 4 = 2²


# -- causality ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pythia", *MEMORY_KINDS])
def test_changing_a_future_token_never_changes_earlier_logits(kind: str) -> None:
    model = _tiny(kind)
    x = torch.randint(0, 512, (2, 5 * SEG))
    base = model(x)
    for t in (3, SEG, 2 * SEG + 5):  # inside the first segment, at a boundary, inside a later one
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 512
        out = model(y)
        assert torch.equal(out[:, :t], base[:, :t]), f"{kind}: logits before {t} changed"
        assert not torch.allclose(out[:, t:], base[:, t:]), f"{kind}: the changed token has no effect"


@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_memory_carries_earlier_segments_into_later_ones(kind: str) -> None:
    """Memory layers only: a token of segment 0 reaches segment 3 through the memory alone."""
    model = _tiny(kind, layers=[kind, kind])
    x = torch.randint(0, 512, (1, 4 * SEG))
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % 512
    assert not torch.allclose(model(x)[:, 3 * SEG:], model(y)[:, 3 * SEG:])


# -- segment-wise processing -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_carried_chunks_equal_one_long_call(kind: str) -> None:
    """With every layer a memory layer, chunks of whole segments with the memory carried between
    calls give the logits of the whole sequence in one call (slots switch across chunks)."""
    model = _tiny(kind, layers=[kind, kind])
    x = torch.randint(0, 512, (2, 6 * SEG))
    whole = model(x)
    reset_memory(model)
    with carry_memory(model):
        chunks = [model(x[:, s:s + 2 * SEG]) for s in range(0, 6 * SEG, 2 * SEG)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), whole, rtol=1e-5, atol=1e-5)
    assert not any(m.carry for m in model.modules() if isinstance(m, MemoryAttention)), "carry must switch off"


def test_without_carry_each_call_starts_from_empty_memory() -> None:
    model = _tiny("infini", layers=["infini", "infini"])
    x = torch.randint(0, 512, (1, 2 * SEG))
    first = model(x)
    with carry_memory(model):
        model(x)
    assert torch.equal(model(x), first), "a call outside carry_memory must ignore the stored memory"


def test_memory_read_equals_linear_attention_over_all_earlier_segments() -> None:
    """Linear rule, one bank: the recurrent read of segment s is linear attention over every token of
    segments < s at once: Σ_j σq·σk_j v_j / Σ_j σq·σk_j."""
    torch.manual_seed(0)
    memory = BankedMemory(1, 1, delta=False, eps=1e-6)
    q, k, v = torch.randn(3, 1, 1, 4 * SEG, 6).unbind(0)  # (B, Hm, T, D)
    state = memory.init_state(1, 1, 6, 6, "cpu")
    for s in range(4):
        seg = slice(s * SEG, (s + 1) * SEG)
        read = memory.read(q[:, :, seg], state, s)
        if s:
            scores = elu_plus_one(q[:, :, seg]) @ elu_plus_one(k[:, :, : s * SEG]).transpose(-1, -2)  # (1, 1, L, sL)
            expected = (scores @ v[:, :, : s * SEG]) / scores.sum(-1, keepdim=True)
            torch.testing.assert_close(read, expected, rtol=1e-5, atol=1e-6)
        state = memory.write(k[:, :, seg], v[:, :, seg], state, s)


def test_segment_covering_the_input_is_gated_local_attention() -> None:
    """With one segment the memory is empty: the layer is NoPE causal attention scaled by 1 - sigmoid(β)."""
    model = _tiny("infini", segment_len=4 * SEG)
    attn = model.blocks[0].attn
    x = torch.randn(2, 3 * SEG, 64)
    q, k, v = attn.qkv(x).view(2, -1, 3, 4, 16).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
    expected = torch.softmax((q @ k.transpose(-1, -2)) / 4 + torch.full((3 * SEG,) * 2, -math.inf).triu(1), -1) @ v
    expected = attn.proj(0.5 * expected.transpose(1, 2).reshape(2, 3 * SEG, 64))
    torch.testing.assert_close(attn(x, LayerContext(None, None, None, None)), expected, rtol=1e-5, atol=1e-5)


# -- sizes ---------------------------------------------------------------------------------------------
def test_memory_sizes_at_hidden_512() -> None:
    """fp32 M (Dk x Dv) + z (Dk) per head and slot, an int64 segment counter, multi_memory's counts.

    One head of width 512: 512·512·4 + 512·4 + 8 = 1,050,632 bytes (~1 MiB).
    Eight heads of 64 (the paper's multi-head memory): 8·64·64·4 + 8·64·4 + 8 = 133,128 bytes (~130 KiB).
    Four such memories: 4·(131,072 + 2,048) + 4·4 + 8 = 532,504 bytes.
    """
    with torch.device("meta"):
        assert memory_state_nbytes(create_model("infini")) == 1_050_632
        assert memory_state_nbytes(create_model("infini", memory_heads=8)) == 133_128
        assert memory_state_nbytes(create_model("infini", memory_heads=8), batch=3) == 3 * 133_120 + 8
        assert memory_state_nbytes(create_model("multi_memory", memory_heads=8, num_memories=4)) == 532_504
        assert memory_state_nbytes(create_model("hierarchical", memory_heads=8)) == 2 * 133_120 + 8
        assert memory_state_nbytes(create_model("pythia")) == 0


def test_factory_defaults_and_composition() -> None:
    with torch.device("meta"):
        model = create_model("infini", special_position=-1)
    c = model.config
    assert c.layers == ["pythia"] * 5 + ["infini"]
    assert (c.n_embd, c.n_head, c.intermediate_size) == (512, 8, 2048)
    cfg = model_config("hierarchical", special_position=2, segment_len=64, n_embd=256, n_head=4, coarse_every=3)
    assert cfg.layers[2] == "hierarchical" and cfg.layers.count("pythia") == 5
    assert cfg.extra == {"hierarchical": {"segment_len": 64, "coarse_every": 3}} and cfg.n_embd == 256
    custom = model_config(layers=["infini", "multi_memory", "pythia"], extra={"infini": {"segment_len": 16}})
    assert custom.layers == ["infini", "multi_memory", "pythia"]


@pytest.mark.parametrize(("kind", "options", "fragment"), [
    ("infini", {"segment_len": 0}, "segment_len must be an integer >= 1"),
    ("infini", {"num_memories": 2}, "unknown option(s) ['num_memories']"),
    ("multi_memory", {"memory_heads": 3}, "memory_heads=3 must divide"),
    ("hierarchical", {"coarse_every": 1.5}, "coarse_every must be an integer"),
    ("hierarchical", {"num_memories": 1}, "num_memories must be >= 2"),
    ("infini", {"use_delta_rule": "yes"}, "use_delta_rule must be true or false"),
    ("multi_memory", {"eps": 0}, "eps must be > 0"),
    ("transformer", {}, "unknown model kind"),
    ("pythia", {"segment_len": 8}, "unknown option(s) ['segment_len']"),
])
def test_bad_options_are_one_clear_config_error(kind: str, options: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        model_config(kind, **options)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_bad_extra_in_a_checkpoint_config_fails_at_build() -> None:
    cfg = model_config(layers=["infini", "pythia"], base="tiny-pythia")
    cfg.extra = {"infini": {"segment_len": -4}}
    with pytest.raises(ConfigError, match="segment_len"):
        TransformerLM(cfg)


# -- precision, gradients, decoding --------------------------------------------------------------------
@pytest.fixture(scope="module")
def shakespeare_ids(shared_dir: Path) -> torch.Tensor:
    tok = Tokenizer.from_dir(shared_dir / "tokenizers" / "gpt2")
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")[:40_000]
    return torch.tensor(tok.encode(text)[:4096])


@pytest.mark.parametrize("kind", MEMORY_KINDS)
def test_no_nan_in_bf16_over_long_real_text(kind: str, shakespeare_ids: torch.Tensor) -> None:
    """4,096 real tokens = 128 segments of 32 through the memory layer: bf16 (weights, or autocast)
    stays finite and close to fp32, and the carried memory stays fp32 and finite."""
    torch.manual_seed(0)
    model = create_model(kind, layers=[kind, "pythia"], base="tiny-pythia", vocab_size=50304, block_size=4096,
                         segment_len=32).eval()
    x = shakespeare_ids[None]
    with torch.no_grad():
        ref = model(x, end=1)  # hidden states after the memory layer (B, T, C)
        with torch.autocast("cpu", dtype=torch.bfloat16), carry_memory(model):
            mixed = model(x, end=1)
        state = get_memory_state(model)
        bf16 = model.to(torch.bfloat16)(x, end=1)
    for out in (mixed, bf16):
        assert torch.isfinite(out).all()
        assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for k, t in state.items() if k.endswith(("M", "z")))


def test_carried_memory_is_detached_so_training_can_continue() -> None:
    """Backward through a call that started from a carried memory must not reach the previous graph."""
    model = _tiny("infini").train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randint(0, 512, (2, 2 * SEG))
    with carry_memory(model):
        for _ in range(3):
            model(x).float().logsumexp(-1).mean().backward()
            opt.step()
            opt.zero_grad()
    beta = model.blocks[0].attn.beta
    model(x).float().logsumexp(-1).mean().backward()
    assert beta.grad is not None and beta.grad.abs().sum() > 0, "the gate β must train"


def test_a_kv_cache_is_refused_with_a_clear_error_and_generate_decodes() -> None:
    """A KV cache handed to a memory layer is refused in one line; `generate` decodes the model through
    its segment caches instead (tests/test_memory_decode.py checks the tokens)."""
    model = _tiny("infini")
    cache = KVCache(model.config, 1, 8)
    with pytest.raises(ConfigError, match="cannot run with a KV cache") as err:
        model(torch.tensor([[1, 2, 3]]), cache=cache, input_pos=torch.arange(3))
    assert "\n" not in str(err.value)
    assert len(generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=2, greedy=True)).tokens[0]) >= 1


def test_streaming_another_batch_size_needs_a_reset() -> None:
    model = _tiny("multi_memory")
    with carry_memory(model):
        model(torch.randint(0, 512, (2, SEG)))
        with pytest.raises(ConfigError, match="reset_memory"):
            model(torch.randint(0, 512, (3, SEG)))
        reset_memory(model)
        assert model(torch.randint(0, 512, (3, SEG))).shape == (3, SEG, 512)

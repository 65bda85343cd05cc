"""The persistent fused decode step (one launch per token) against the torch step and the five-kernel step.

Off the GPU the kernel runs in Triton's CPU interpreter with one program (programs run one after
another there, so more would wait forever at the first grid barrier); `tests/test_cuda.py` runs the
full grid on a GPU, and `tests/compile_kernels.py` compiles it for sm_90.
"""

from __future__ import annotations

import pytest
import torch

from legolm.errors import ConfigError
from legolm.generation import GenerationConfig, generate
from legolm.generation.persistent import PersistentDecodeStep, PersistentShape
from tests.test_fused_decode import _model, assert_matches_torch_step

# a chunk smaller than a program's rows (tiny models: 64 channels, 192-512 rows) so that each phase loops
SHAPE = PersistentShape(max_block_n=16, tile=256, head_block_n=32, head_tile=1024)


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-pythia", "tiny-llama"])
@torch.inference_mode()
def test_persistent_step_matches_torch_step(preset: str) -> None:
    """Logits of every step and the cache it writes (fp32; GPT-2: sequential blocks, Pythia: parallel and
    partial RoPE, Llama: split q/k/v, GQA, SwiGLU, RMSNorm), prompts longer than one attention tile."""
    model = _model(preset)
    step = PersistentDecodeStep(model, SHAPE, attention_block=4, embed_block=32)
    assert_matches_torch_step(model, step)
    assert step.sync.tolist() == [0, 0], "a step left the barrier counters set"


@torch.inference_mode()
def test_persistent_generate_gives_the_blocks_tokens_and_stops_at_eos() -> None:
    """Greedy tokens come from the kernel's own head partials and last-program reduction; EOS stops the row."""
    model = _model("tiny-pythia")
    prompts = [[5, 6, 7, 8, 9, 10, 11]]
    blocks = GenerationConfig(max_new_tokens=10, greedy=True, stop_at_eos=False, fused=True, fused_tune=False)
    persistent = GenerationConfig(max_new_tokens=10, greedy=True, stop_at_eos=False, fused=True,
                                  fused_kernel="persistent", fused_persistent=SHAPE)
    want = generate(model, prompts, blocks).tokens
    assert generate(model, prompts, persistent).tokens == want
    row = want[0]
    eos = next(t for i, t in enumerate(row) if i >= 2 and t not in row[:i])
    persistent.stop_at_eos = True
    assert generate(model, prompts, persistent, eos_id=eos).tokens == [row[: row.index(eos) + 1]]


def test_persistent_refuses_what_it_cannot_run() -> None:
    model = _model("tiny-gpt2")
    model.blocks[1].attn.proj.bias = None  # type: ignore[union-attr]  # one block unlike the other
    with pytest.raises(ConfigError, match="blocks of one shape"):
        PersistentDecodeStep(model, SHAPE, attention_block=4, embed_block=32)
    mixed = _model("tiny-pythia")
    mixed.lm_head.weight.data = mixed.lm_head.weight.data.to(torch.float64)
    with pytest.raises(ConfigError, match="one dtype"):
        PersistentDecodeStep(mixed, SHAPE, attention_block=4, embed_block=32)
    with pytest.raises(ConfigError, match="power of two"):
        GenerationConfig(fused=True, fused_persistent=PersistentShape(tile=3000)).validate()
    with pytest.raises(ConfigError, match="drop --fused-kernel persistent, or --early-exit"):
        GenerationConfig(fused=True, greedy=True, fused_kernel="persistent", early_exit="threshold").validate()
    for early_exit in ("threshold", "speculative"):  # split-K blocks serve both LEGO decoders
        GenerationConfig(fused=True, greedy=True, fused_kernel="splitk", early_exit=early_exit).validate()
    with pytest.raises(ConfigError, match="fused_kernel must be one of blocks, splitk, splitk-exact, persistent"):
        GenerationConfig(fused=True, fused_kernel="megakernel").validate()  # type: ignore[arg-type]

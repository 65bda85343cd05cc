"""Batched, KV-cached generation for prompts of different lengths.

Prompts are left-padded into one (B, P) batch; each row's positions count from its own first
token, pad slots are masked out of attention, and every step decodes one token for all rows
through a static cache (`Decoder`). Rows stop at EOS independently.
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from legolm.data.tokenizer import Tokenizer
from legolm.errors import ConfigError
from legolm.generation.decoder import COMPILE_MODES, DecodeSession
from legolm.generation.early_exit import EarlyExitStats, KVMode, generate_speculative, generate_with_early_exit
from legolm.generation.fused import check_fused, split_k_sums
from legolm.generation.fused_early_exit import FusedExitConfig, FusedLegoSession, fused_lego_generate
from legolm.generation.memory_decode import generate_memory, has_memory_layers
from legolm.generation.persistent import FusedKernel, PersistentShape, check_fused_kernel, fused_step
from legolm.generation.sampling import next_token
from legolm.model.lego import LegoLM
from legolm.model.transformer import TransformerLM
from legolm.utils.structure import walk_once


@dataclass
class GenerationConfig:
    """How to generate.

    Attributes:
        max_new_tokens: Tokens to add to each prompt.
        greedy: Take the most likely token (ignores temperature/top_k/top_p).
        temperature: Softmax temperature when sampling (> 0).
        top_k: Sample among the k most likely tokens (0 = all).
        top_p: Nucleus sampling mass (1.0 = off).
        stop_at_eos: Stop a row once it emits the EOS id.
        seed: Seed of the sampling generator (None = nondeterministic).
        cuda_graph: Replay each decode step as a CUDA graph (ignored off CUDA).
        compile: `torch.compile` the decode step (GPU fast path).
        compile_mode: Its `torch.compile` mode: "default", or "max-autotune-no-cudagraphs" (tunes
            Triton matmul templates that can fuse their epilogues; slower first call).
        fused: Decode through the fused Triton kernels (`legolm.kernels.decode`): five launches per
            block instead of a dozen, captured into one CUDA graph. Batch 1, plain blocks (merge
            adapters first), CUDA (``TRITON_INTERPRET=1`` runs them on the CPU, slowly); ``compile``
            does not apply to it.
        fused_attention_block: Cache slots per tile of the fused attention kernel when it is not tuned
            (a power of two).
        fused_embed_block: Channels per tile of the fused embedding kernel (a power of two).
        fused_tune: Time the fused GEMV and attention launch shapes on the GPU at the first step and keep
            the fastest.
        fused_pdl: Launch the fused GEMV and attention kernels with programmatic dependent launch (sm_90+
            and a Triton that has it; ignored elsewhere): each kernel loads its weights while the
            previous one finishes.
        fused_if_nodes: Fused threshold early exit: each token's branch to the upper layers as an IF node of
            the captured graph where the driver has them (`legolm.kernels.graph_if`; ``graph_steps`` tokens per
            replay, no host read). Off, or where they are missing: one graph per part of a step and a host
            read of each token's decision. None (auto, the default): what measured faster on an H200
            (README, LEGO): IF nodes for kv_mode skip, the host read for fill.
        fused_kernel: ``blocks`` (five kernel launches per block, launch shapes tuned, PDL), ``splitk``
            (three per block: the projections after the attention and the MLP reduce by fp32 atomic adds, so
            the last bits of a sum vary from run to run; `legolm.kernels.splitk`), ``splitk-exact`` (the same
            into an int64 fixed-point residual stream: exact sums, the same bits on every run, about 6% slower
            than ``splitk`` and faster than ``blocks``; the default; self-speculative decoding on split-K blocks
            always sums exactly) or
            ``persistent`` (the whole step in one launch of one program per SM, grid barriers between
            its phases; `legolm.kernels.persistent`; plain decoding only, not LEGO early exit).
        fused_persistent: Launch shape of the persistent step.
        prefill_graphs: With ``cuda_graph``, prompt lengths per session whose prefill is replayed as a
            CUDA graph (captured at a length's first use; 0 = eager prefill).
        eos_check_every: Steps between checks whether every row is done (each check syncs the GPU); with EOS
            stopping on, it also bounds ``graph_steps``, so decoding stops within this many steps of the
            last row's EOS.
        cache_bucket: KV-cache lengths are rounded up to a multiple of this, so calls of similar
            lengths share one cached session (cache buffers and captured graph).
        session_cache_size: Decoding sessions kept per model for reuse (0 = build one per call).
        early_exit: LEGO models only: ``threshold`` (tokens whose shallow confidence reaches τ skip the
            upper layers) or ``speculative`` (the shallow exit drafts, the upper layers verify: output
            identical to full-depth greedy decoding); ``none`` decodes the deep model.
        threshold: τ of threshold early exit in [0, 1] (None: the model's calibrated τ, or target_ratio's).
        target_ratio: Instead of τ: the fraction of calibration tokens made hard (routed to the upper
            layers), turned into τ with the quantiles stored at calibration.
        kv_mode: Threshold mode's upper KV cache for exited tokens: skip (left out; the fastest), fill (exact:
            queued tokens run through the upper layers with the next deep one) or propagate (their K/V projected
            from the lower states; without --fused only). None: the model's own, which `legolm lego` measured
            (`LegoMeta.kv_mode`: skip where its decode-path PPL kept within `decode.kv_tolerance` of fill's, else
            fill), else `DEFAULT_KV_MODE`.
        draft_tokens: Speculative mode: tokens the shallow exit drafts per verify pass (3: the fastest of 2, 3 and
            4 on the H200 for the grown LEGO model, docs/results/lego.md "LEGO: lean calls").
        fill_buckets: Fused fill mode: row counts of the captured lazy-fill passes (the largest bounds
            the queue of exited tokens).
        graph_steps: Greedy decoding: tokens per CUDA graph replay (each step emits its token on the device,
            so steps chain without the host; the last few of a call replay one by one); fused LEGO
            decoding: tokens (threshold) or rounds (speculative) per CUDA graph. Sampling replays one step
            at a time (the host samples each token).
    """

    max_new_tokens: int = 64
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_at_eos: bool = True
    seed: int | None = None
    cuda_graph: bool = True
    compile: bool = False
    compile_mode: str = "default"
    fused: bool = False
    fused_attention_block: int = 64
    fused_embed_block: int = 1024
    fused_tune: bool = True
    fused_pdl: bool = True
    fused_if_nodes: bool | None = None
    fused_kernel: FusedKernel = "splitk-exact"
    fused_persistent: PersistentShape = field(default_factory=PersistentShape)
    prefill_graphs: int = 4
    eos_check_every: int = 8
    cache_bucket: int = 256
    session_cache_size: int = 4
    early_exit: Literal["none", "threshold", "speculative"] = "none"
    threshold: float | None = None
    target_ratio: float | None = None
    kv_mode: Literal["fill", "skip", "propagate"] | None = None
    draft_tokens: int = 3
    fill_buckets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    graph_steps: int = 16

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0 and not self.greedy:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}; use --greedy for argmax decoding")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:  # what torch.Generator.manual_seed takes
            raise ConfigError(f"seed must be in [0, 2**64 - 1] (or unset), got {self.seed}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.cache_bucket < 1:
            raise ConfigError(f"cache_bucket must be >= 1, got {self.cache_bucket}")
        if self.prefill_graphs < 0:
            raise ConfigError(f"prefill_graphs must be >= 0, got {self.prefill_graphs}")
        if self.session_cache_size < 0:
            raise ConfigError(f"session_cache_size must be >= 0, got {self.session_cache_size}")
        for name in ("fused_attention_block", "fused_embed_block"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ConfigError(f"{name} must be a power of two, got {value}")
        if self.eos_check_every < 1:
            raise ConfigError(f"eos_check_every must be >= 1, got {self.eos_check_every}")
        if self.graph_steps < 1:
            raise ConfigError(f"graph_steps must be >= 1, got {self.graph_steps}")
        check_fused_kernel(self.fused_kernel, self.fused_persistent, self.early_exit)
        self._validate_early_exit()

    def _validate_early_exit(self) -> None:
        checks = [
            (self.early_exit in ("none", "threshold", "speculative"),
             f"early_exit must be none, threshold or speculative, got {self.early_exit!r}"),
            (self.threshold is None or (0.0 <= self.threshold <= 1.0),
             f"threshold must be in [0, 1] (a max softmax probability), got {self.threshold}"),
            (self.target_ratio is None or 0.0 < self.target_ratio < 1.0,
             f"target_ratio must be in (0, 1) (the fraction of tokens routed to the upper layers), got "
             f"{self.target_ratio}"),
            (self.threshold is None or self.target_ratio is None, "give threshold or target_ratio, not both"),
            (self.kv_mode in (None, "fill", "skip", "propagate"), f"kv_mode must be fill, skip or propagate, got "
                                                                  f"{self.kv_mode!r}"),
            (self.draft_tokens >= 1, f"draft_tokens must be >= 1, got {self.draft_tokens}"),
            (bool(self.fill_buckets) and all(b >= 1 for b in self.fill_buckets)
             and sorted(set(self.fill_buckets)) == list(self.fill_buckets),
             f"fill_buckets must be increasing row counts >= 1, got {self.fill_buckets}"),
            (self.early_exit != "speculative" or self.greedy, "speculative decoding is greedy: add --greedy"),
            (self.early_exit == "none" or not self.fused or self.greedy,
             "fused early exit decodes greedily: add --greedy, or drop --fused to sample"),
            (self.early_exit == "none" or not self.fused or self.kv_mode != "propagate"
             or self.early_exit == "speculative",
             "fused early exit supports kv_mode fill or skip; drop --fused for propagate"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass
class GenerationResult:
    """New tokens per prompt (EOS included when hit), timing, and what LEGO decoding did (if it ran)."""

    tokens: list[list[int]]
    prefill_s: float
    decode_s: float
    steps: int
    early_exit: EarlyExitStats | None = None


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """(B, P) left-padded ids and (B,) lengths, built on the host and copied once each."""
    P = max(len(p) for p in prompts)
    idx = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], dtype=torch.long)
    return idx.to(device), torch.tensor([len(p) for p in prompts]).to(device)


def _check_prompts(model: TransformerLM, prompts: Sequence[Sequence[int]], max_new: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("empty prompt: give at least one token of text to continue")
    longest = max(len(p) for p in prompts) + max_new
    if longest > model.config.block_size:
        raise ConfigError(f"prompt + max_new_tokens = {longest} exceeds the model's context of "
                          f"{model.config.block_size}; shorten the prompt or lower --max-new-tokens")
    bad = [t for p in prompts for t in p if not 0 <= t < model.config.vocab_size]
    if bad:
        raise ConfigError(f"token id {bad[0]} is outside the model's vocabulary of {model.config.vocab_size}")


_SESSIONS: weakref.WeakKeyDictionary[TransformerLM, OrderedDict[tuple[Any, ...], DecodeSession]] = (
    weakref.WeakKeyDictionary()
)


def _weights_key(model: TransformerLM) -> tuple[Any, ...]:
    """Identity of the modules and parameter storages a captured graph reads.

    Injecting an adapter, replacing a layer or re-assigning weights changes it, so a session built
    for the old model is never replayed on the new one. The tree is walked once while no module
    changes (`walk_once`); the storages are read at every call (``.to()`` moves them without a change
    of the tree).
    """
    modules, params = walk_once(model, _tree)
    return modules, tuple(p.data_ptr() for p in params)


def _tree(model: nn.Module) -> tuple[tuple[tuple[int, int], ...], list[nn.Parameter]]:
    """Each module's id and count of own parameters, and those parameters in order."""
    modules = list(model.modules())
    own = [list(m.parameters(recurse=False)) for m in modules]
    return tuple((id(m), len(p)) for m, p in zip(modules, own, strict=True)), [p for ps in own for p in ps]


def _session(model: TransformerLM, batch: int, needed: int, config: GenerationConfig,
             eos: int | None) -> DecodeSession:
    """A reusable `DecodeSession` for this shape (least recently used ones are dropped)."""
    bucket = config.cache_bucket
    max_len = min(-(-needed // bucket) * bucket, model.config.block_size)
    device = next(model.parameters()).device
    graph = config.cuda_graph and device.type == "cuda"
    fused = (config.fused_attention_block, config.fused_embed_block, config.fused_tune, config.fused_pdl,
             config.fused_kernel, config.fused_persistent) if config.fused else None
    key = (_weights_key(model), batch, max_len, config.greedy, eos, graph, config.compile, config.compile_mode, fused,
           config.prefill_graphs)
    sessions = _SESSIONS.setdefault(model, OrderedDict())
    if key in sessions:
        sessions.move_to_end(key)
        return sessions[key]
    step = None
    if config.fused:
        check_fused(batch, device)
        step = fused_step(model, config.fused_kernel, config.fused_persistent, config.fused_attention_block,
                          config.fused_embed_block, config.fused_tune, config.fused_pdl)
    session = DecodeSession(model, batch, max_len, config.greedy, eos, cuda_graph=graph, compile=config.compile,
                            compile_mode=config.compile_mode, step=step, prefill_graphs=config.prefill_graphs)
    if config.session_cache_size > 0:
        sessions[key] = session
        while len(sessions) > config.session_cache_size:
            sessions.popitem(last=False)
    return session


def clear_sessions(model: TransformerLM) -> None:
    """Free the cached KV caches and CUDA graphs of ``model``."""
    _SESSIONS.pop(model, None)
    if isinstance(model, LegoLM):
        _LEGO_SESSIONS.pop(model, None)


@torch.inference_mode()
def generate(model: TransformerLM, prompts: Sequence[Sequence[int]], config: GenerationConfig,
             eos_id: int | None = None) -> GenerationResult:
    """Continue each prompt (a list of token ids) by up to ``config.max_new_tokens`` tokens.

    A `LegoLM` with ``config.early_exit`` set decodes through its exits (`generate_lego`).
    """
    config.validate()
    _check_prompts(model, prompts, config.max_new_tokens)
    if config.early_exit != "none":
        return generate_lego(model, prompts, config, eos_id)
    if has_memory_layers(model):
        return _generate_with_memory(model, prompts, config, eos_id)
    device = next(model.parameters()).device
    idx, lengths = _left_pad(prompts, device)
    P, N = idx.shape[1], config.max_new_tokens
    gen = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
    eos = eos_id if config.stop_at_eos else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    session = _session(model, len(prompts), P + N, config, eos)

    def sample(lg: Tensor) -> Tensor:
        return next_token(lg, config.greedy, config.temperature, config.top_k, config.top_p, gen)

    t0 = time.perf_counter()
    logits = session.prefill(idx, lengths)
    session.start(sample(logits), P, lengths)
    sync()
    t1 = time.perf_counter()
    per_replay = config.graph_steps if config.greedy else 1  # sampling: the host samples each token
    if eos is not None:  # a check falls between replays: stop within eos_check_every steps of the last EOS
        per_replay = min(per_replay, config.eos_check_every)
    t, next_check = 1, config.eos_check_every
    while t < N:
        if eos is not None and t >= next_check:
            if bool(session.state.finished.all()):
                break
            next_check = t + config.eos_check_every
        n = per_replay if N - t >= per_replay else 1
        logits = session.step(n)
        if not config.greedy:
            session.emit(sample(logits))
        t += n
    steps = int(session.state.t.item())
    t2 = time.perf_counter()
    return GenerationResult(_trim(session.state.tokens[:, :steps].tolist(), eos), t1 - t0, t2 - t1, steps)


def _generate_with_memory(model: TransformerLM, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                          eos_id: int | None) -> GenerationResult:
    """Memory-layer models: each prompt through `legolm.generation.memory_decode` (memory carried across the
    prompt and the new tokens)."""
    if config.fused or config.compile:
        raise ConfigError("memory-layer models decode through their segment caches: drop --fused / --compile")
    rows, prefill_s, decode_s, steps = generate_memory(
        model, prompts, config.max_new_tokens, greedy=config.greedy, temperature=config.temperature,
        top_k=config.top_k, top_p=config.top_p, seed=config.seed, eos_id=eos_id if config.stop_at_eos else None)
    return GenerationResult(rows, prefill_s, decode_s, steps)


def lego_threshold(model: LegoLM, config: GenerationConfig) -> float:
    """τ of threshold early exit: the config's, else its target ratio's (stored quantiles), else the model's."""
    if config.threshold is not None:
        return config.threshold
    if config.target_ratio is not None:
        return model.threshold_for_ratio(config.target_ratio)
    return model.threshold


DEFAULT_KV_MODE: KVMode = "skip"  # threshold mode's upper cache for a model that measured none (the fastest)


def lego_kv_mode(model: LegoLM, config: GenerationConfig) -> KVMode:
    """Threshold mode's upper-cache mode: the config's, else the one `legolm lego` measured for this model, else
    `DEFAULT_KV_MODE`."""
    return config.kv_mode or model.meta.kv_mode or DEFAULT_KV_MODE


def _as_lego(model: TransformerLM, config: GenerationConfig) -> LegoLM:
    if not isinstance(model, LegoLM) or not model.extended:
        raise ConfigError(f"--early-exit {config.early_exit} needs a LEGO model with a shallow exit (the model/ "
                          f"directory `legolm lego` writes); this {type(model).__name__} has none")
    return model


def generate_lego(model: TransformerLM, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                  eos_id: int | None = None) -> GenerationResult:
    """LEGO decoding: threshold early exit or self-speculative, fused (batch 1, greedy) or with torch ops."""
    lego = _as_lego(model, config)
    eos = eos_id if config.stop_at_eos else None
    tau = lego_threshold(lego, config) if config.early_exit == "threshold" else 0.0
    kv_mode = lego_kv_mode(lego, config)
    device = next(model.parameters()).device
    if config.fused:
        check_fused(len(prompts), device)
        session = _lego_session(lego, len(prompts[0]), config, kv_mode, eos)
        tokens, stats = fused_lego_generate(session, prompts[0], config.max_new_tokens, tau, config.eos_check_every)
        rows = [tokens]
    elif config.early_exit == "speculative":
        if len(prompts) != 1:
            raise ConfigError(f"speculative decoding takes one prompt, got {len(prompts)}")
        out = generate_speculative(lego, torch.tensor([list(prompts[0])]), config.max_new_tokens, config.draft_tokens,
                                   eos)
        rows, stats = out.tokens.tolist(), out.stats
    else:
        if len({len(p) for p in prompts}) > 1:
            raise ConfigError("early exit without --fused decodes prompts of one length together; give prompts "
                              "of equal token length or one prompt")
        res = generate_with_early_exit(lego, torch.tensor([list(p) for p in prompts]), config.max_new_tokens, tau,
                                       kv_mode=kv_mode, greedy=config.greedy,
                                       temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                                       seed=config.seed, eos_id=eos)
        rows, stats = res.tokens.tolist(), res.stats
    return GenerationResult(_trim(rows, eos), stats.prefill_s, stats.decode_s, stats.decode_steps, stats)


_LEGO_SESSIONS: weakref.WeakKeyDictionary[LegoLM, OrderedDict[tuple[Any, ...], FusedLegoSession]] = (
    weakref.WeakKeyDictionary()
)


def _lego_session(model: LegoLM, prompt_len: int, config: GenerationConfig, kv_mode: KVMode,
                  eos: int | None) -> FusedLegoSession:
    """A reusable fused LEGO session for this shape and mode (least recently used ones dropped).

    A captured graph runs whole units, so the last replay may go past ``max_new_tokens``: its
    units are bounded so that no position reaches the model's context (RoPE tables, learned positions).
    """
    room = model.config.block_size - (prompt_len + config.max_new_tokens)  # >= 0: checked with the prompts
    if config.early_exit == "speculative":
        d = config.draft_tokens
        if room < d:
            raise ConfigError(f"prompt + max_new_tokens + draft_tokens = {model.config.block_size - room + d} "
                              f"exceeds the model's context of {model.config.block_size} (the last round drafts "
                              "past the end); generate fewer tokens")
        steps = max(1, min(config.graph_steps, 1 + (room + 1 - d) // (d + 1)))
        overshoot = steps * (d + 1)
    else:
        steps = max(1, min(config.graph_steps, room + 1))
        overshoot = steps
    needed = prompt_len + config.max_new_tokens + overshoot
    max_len = min(-(-needed // config.cache_bucket) * config.cache_bucket, model.config.block_size)
    split_k, exact = split_k_sums(config.fused_kernel)
    mode = FusedExitConfig(mode=config.early_exit, kv_mode=kv_mode, draft_tokens=config.draft_tokens,
                           fill_buckets=tuple(config.fill_buckets), steps_per_graph=steps,
                           attention_block=config.fused_attention_block, embed_block=config.fused_embed_block,
                           tune=config.fused_tune, pdl=config.fused_pdl, split_k=split_k, exact_sums=exact,
                           prefill_graphs=config.prefill_graphs, if_nodes=config.fused_if_nodes)
    key = (_weights_key(model), max_len, config.max_new_tokens + overshoot, eos, mode)
    sessions = _LEGO_SESSIONS.setdefault(model, OrderedDict())
    if key in sessions:
        sessions.move_to_end(key)
        return sessions[key]
    session = FusedLegoSession(model, max_len, config.max_new_tokens + overshoot, eos, mode)
    if config.session_cache_size > 0:
        sessions[key] = session
        while len(sessions) > config.session_cache_size:
            sessions.popitem(last=False)
    return session


def _trim(rows: list[list[int]], eos: int | None) -> list[list[int]]:
    """Cut each row after its first EOS (kept, as Hugging Face does)."""
    if eos is None:
        return rows
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def generate_text(model: TransformerLM, tokenizer: Tokenizer, prompts: Sequence[str],
                  config: GenerationConfig) -> list[str]:
    """Text in, continuations out (special tokens dropped)."""
    return complete(model, tokenizer, prompts, config)[0]


def complete(model: TransformerLM, tokenizer: Tokenizer, prompts: Sequence[str],
             config: GenerationConfig) -> tuple[list[str], GenerationResult]:
    """Text in: the continuations (special tokens dropped) and the `GenerationResult` (tokens, timing, stats)."""
    if any(not p for p in prompts):
        raise ConfigError("empty prompt: give at least one character of text to continue")
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else model.config.eos_token_id
    result = generate(model, [tokenizer.encode(p) for p in prompts], config, eos_id=eos)
    return [tokenizer.decode(row) for row in result.tokens], result

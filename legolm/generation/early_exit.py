"""TRUE early-exit generation: the upper layers are not run at all for confident tokens.

Each step runs the lower layers (their own KV cache) and the frozen shallow exit; a token whose
shallow confidence (max softmax probability) is >= τ is emitted from the shallow exit and the
upper layers are skipped; otherwise the upper layers (a second KV cache) and the deep exit run::

    tok ─ lower layers ─ h_s ─ shallow exit ─ conf ≥ τ ? ──yes── shallow token      (split layer calls)
           [lower cache]                        │
                                                no
                                                └─ upper layers ─ deep exit ─ deep token   (all L)
                                                   [upper cache]

An exited token leaves no keys/values in the upper cache. Three ways to deal with that
(``kv_mode``):

* ``fill`` (exact, FREE-style lazy fill; Bae et al. 2023, "Fast and Robust Early-Exiting
  Framework", arXiv 2310.05424): the exited tokens' h_s wait in a queue; at the next deep token
  the upper layers run once over the queue plus that token (one call per layer, T = k + 1), which
  writes the exact keys/values every exited token would have had. Deep tokens then get exactly the
  logits of the full-depth model on the same history. Tokens that exit at the end are never run.
* ``skip``: the upper cache holds only prompt and deep tokens (its slots are dense), while RoPE
  positions stay the tokens' true (cumulative) positions. Cheapest, approximate.
* ``propagate`` (CALM-style state propagation; Schuster et al. 2022): for an exited token every
  upper layer's key/value projection is computed from h_s (no attention, no MLP). Approximate.

Batches: rows advance together; the upper layers run for the whole batch when any unfinished row
is below τ, and each row still takes its own token (the shallow one where it is confident). With
``fill`` a row's tokens therefore do not depend on the other rows. Prompts of one call share a
length (no padding).

Two costs are reported, both over the decode steps (the prefill, all L layers over the prompt and
the same in every mode, is reported apart):

* ``actual_compute_cost`` = token-layer evaluations ÷ (decode steps × L): the real compute (a
  layer call over T tokens counts T). ``fill`` runs the queued tokens later, so it saves only what
  exits at the very end; ``skip`` and ``propagate`` save every exited token's upper layers.
* ``call_cost`` = layer calls ÷ (decode steps × L): a call counts once whatever its T. At batch 1
  on a GPU a decode step is bound by reading the weights, not by T, so this is what ``fill`` saves
  there.

The tests count both with forward hooks on the blocks (calls, and the T each call saw).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from legolm.core.context import LayerContext
from legolm.core.kv_cache import KVCache, LayerKVCache
from legolm.core.rope import apply_rope
from legolm.errors import ConfigError
from legolm.generation.sampling import next_token
from legolm.layers.attention import CausalSelfAttention, SplitQKV
from legolm.model.lego import LegoLM, check_threshold, confidence, exits
from legolm.utils.structure import walk_once

KVMode = Literal["fill", "skip", "propagate"]
KV_MODES: tuple[KVMode, ...] = ("fill", "skip", "propagate")


@dataclass
class EarlyExitStats:
    """What one early-exit generation call did.

    Attributes:
        shallow_count: Emitted tokens taken from the shallow exit (all rows, until each row's EOS).
        deep_count: Emitted tokens taken from the deep exit.
        shallow_ratio: shallow_count / (shallow_count + deep_count).
        decode_steps: Steps after the prefill (each feeds one token per row).
        layer_calls: Transformer-block calls in the whole call (prefill included).
        prefill_layer_calls: Of those, the prefill's (always L).
        token_layer_evals: Decode-step (token × layer) evaluations per row (a call over T tokens counts T).
        actual_compute_cost: token_layer_evals ÷ (decode_steps × L); 1.0 = full depth every step.
        call_cost: Decode layer calls ÷ (decode_steps × L) (what a weight-bandwidth-bound GPU pays).
        macs_cost: Decode weight multiply-adds (blocks, both exits' heads, propagated K/V projections;
            attention scores left out) ÷ those of full depth (all blocks + one head per step): unlike the
            layer counts it charges the shallow exit that every routed step evaluates.
        kv_projections: Upper-layer key/value projections of exited tokens (``propagate``).
        prefill_s: Wall time of the prefill (s).
        decode_s: Wall time of the decode steps (s).
        wall_s: prefill_s + decode_s.
        rounds: Self-speculative draft-and-verify rounds (0 in threshold mode).
        drafted: Tokens the shallow exit drafted in them.
        accepted: Drafts the deep model confirmed.
        kv_mode: Threshold mode's upper-cache mode (fill, skip or propagate); None for self-speculative decoding.
    """

    shallow_count: int
    deep_count: int
    shallow_ratio: float
    decode_steps: int
    layer_calls: int
    prefill_layer_calls: int
    token_layer_evals: int
    actual_compute_cost: float
    call_cost: float
    macs_cost: float
    kv_projections: int
    prefill_s: float
    decode_s: float
    wall_s: float
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    kv_mode: str | None = None

    @property
    def acceptance_rate(self) -> float:
        """Confirmed drafts ÷ drafts (self-speculative)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Emitted tokens per verify pass of the upper layers (self-speculative; the first token is the prefill's)."""
        return (self.shallow_count + self.deep_count - 1) / self.rounds if self.rounds else 0.0

    def line(self, tokens: int) -> str:
        """The one stats line `legolm generate` prints."""
        rate = tokens / self.decode_s if self.decode_s > 0 else float("inf")
        head = (f"speculative: acceptance {self.acceptance_rate:.3f}, {self.tokens_per_round:.2f} tokens per verify"
                if self.rounds else f"early exit (kv {self.kv_mode}): shallow ratio {self.shallow_ratio:.3f}")
        return (f"{head}, call cost {self.call_cost:.3f}, weight cost {self.macs_cost:.3f} (vs full depth), "
                f"{rate:,.0f} tok/s decode, prefill {1000 * self.prefill_s:.1f} ms")


@dataclass
class EarlyExitResult:
    """New tokens (B, N), where each came from the shallow exit (B, N), the stats, optional logits (B, N, V)."""

    tokens: Tensor
    exited: Tensor
    stats: EarlyExitStats
    logits: Tensor | None = None


class _TwoCacheDecoder:
    """Lower and upper KV caches and the three ways of handling exited tokens in the upper cache."""

    def __init__(self, model: LegoLM, batch: int, max_len: int, kv_mode: KVMode) -> None:
        p = next(model.parameters())
        cfg, s, L = model.config, model.split, model.n_layer
        self.model, self.kv_mode, self.batch = model, kv_mode, batch
        self.lower_cache = KVCache(cfg, batch, max_len, layers=range(s), dtype=p.dtype, device=p.device)
        self.upper_cache = KVCache(cfg, batch, max_len, layers=range(s, L), dtype=p.dtype, device=p.device)
        self.device = p.device
        self.slots = torch.arange(max_len, device=p.device)  # positions as device tensors without a copy per step
        self.upper_len = 0  # slots of the upper cache in use (skip mode: dense)
        self.queue: list[tuple[Tensor, int]] = []  # fill mode: (h_s (B, 1, C), position) of exited tokens
        self.layer_calls = self.token_layers = self.kv_projections = self.macs = 0
        # weight multiply-adds per token: each block's linear layers, an exit head, one layer's K/V projection
        self.block_macs = [sum(m.weight.numel() for m in b.modules() if isinstance(m, nn.Linear))
                           for b in model.blocks]
        self.head_macs = model.lm_head.weight.numel()
        self.kv_macs = 2 * cfg.n_embd * cfg.kv_heads * cfg.hd
        self.full_step_macs = sum(self.block_macs) + self.head_macs

    def _count(self, start: int, end: int, tokens: int) -> None:
        """Record a call of blocks start..end-1 over ``tokens`` tokens per row."""
        self.layer_calls += end - start
        self.macs += tokens * sum(self.block_macs[start:end])

    def _pos(self, first: int, last: int | None = None) -> Tensor:
        """Position ids ``first..last`` (default: just ``first``), a view of ``slots``: no copy per step."""
        return self.slots[first:(first if last is None else last) + 1]

    def prefill(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """All layers over the prompt (B, P): (h_s, deep logits) of its last token, (B, 1, C) and (B, V)."""
        P = idx.shape[1]
        pos = torch.arange(P, device=self.device)
        h_s = self.model.lower(idx, cache=self.lower_cache, input_pos=pos)  # (B, P, C)
        deep = self.model.upper_last_logits(h_s, cache=self.upper_cache, input_pos=pos)  # (B, V)
        self.upper_len = P
        self._count(0, self.model.n_layer, P)
        self.macs = 0  # the cost counters are for the decode steps
        return h_s[:, -1:], deep

    def lower(self, tok: Tensor, position: int) -> Tensor:
        """Lower layers on the last token (B, 1) at ``position`` -> h_s (B, 1, C)."""
        self._count(0, self.model.split, 1)
        self.token_layers += self.model.split
        return self.model.lower(tok, cache=self.lower_cache, input_pos=self._pos(position))

    def upper(self, h_s: Tensor, position: int) -> Tensor:
        """Upper layers and the deep exit for the token at ``position`` -> deep logits (B, V)."""
        n_upper = self.model.n_layer - self.model.split
        if self.kv_mode == "fill":  # the queued exited tokens first, in the same call
            h = torch.cat([q for q, _ in self.queue] + [h_s], dim=1)  # (B, k + 1, C)
            slots = self._pos(self.queue[0][1] if self.queue else position, position)  # queued steps are consecutive
            self.queue.clear()
            logits = self.model.upper_last_logits(h, cache=self.upper_cache, input_pos=slots)
            self.token_layers += n_upper * h.shape[1]
            self._count(self.model.split, self.model.n_layer, h.shape[1])
        else:  # skip: dense slots, true positions; propagate: slot = position
            slot = self.upper_len if self.kv_mode == "skip" else position
            positions = self._pos(position).expand(self.batch, 1)
            logits = self.model.upper_last_logits(h_s, cache=self.upper_cache, input_pos=self._pos(slot),
                                                  positions=positions)
            self.token_layers += n_upper
            self._count(self.model.split, self.model.n_layer, 1)
        self.upper_len += 1
        self.macs += self.head_macs
        return logits

    def exited(self, h_s: Tensor, position: int) -> None:
        """Record a step whose tokens all left at the shallow exit."""
        if self.kv_mode == "fill":
            self.queue.append((h_s, position))
        elif self.kv_mode == "propagate":
            self._propagate(h_s, position)

    def _propagate(self, h_s: Tensor, position: int) -> None:
        """Write every upper layer's K/V computed from h_s (CALM's propagated state)."""
        model = self.model
        pos = self._pos(position)
        ctx = model.make_context(pos.expand(self.batch, 1), h_s.dtype, input_pos=pos)
        for i in range(self.model.split, self.model.n_layer):
            layer_cache = self.upper_cache.get(i)
            assert layer_cache is not None
            write_kv(model.blocks[i], h_s, ctx, layer_cache)
            self.kv_projections += 1
            self.macs += self.kv_macs


def write_kv(block: nn.Module, h: Tensor, ctx: LayerContext, cache: LayerKVCache) -> None:
    """Compute only a block's keys/values of input ``h`` (B, T, C) and store them at ``ctx.input_pos``.

    Raises:
        ConfigError: The block has no ``norm_1`` + `CausalSelfAttention` (propagate needs them).
    """
    attn, norm = getattr(block, "attn", None), getattr(block, "norm_1", None)
    if not isinstance(attn, CausalSelfAttention) or not isinstance(norm, nn.Module):
        raise ConfigError(f"kv_mode 'propagate' needs blocks with norm_1 and attn; {type(block).__name__} has "
                          "not; use kv_mode 'fill'")
    B, T, _ = h.shape
    H, Hkv, D = attn.n_head, attn.n_kv_head, attn.head_dim
    x = norm(h)
    if isinstance(attn.qkv, SplitQKV):
        k, v = attn.qkv.k_proj(x), attn.qkv.v_proj(x)
    elif isinstance(attn.qkv, nn.Linear):  # only the k/v rows of the fused projection
        bias = attn.qkv.bias[H * D:] if attn.qkv.bias is not None else None
        k, v = F.linear(x, attn.qkv.weight[H * D:], bias).split([Hkv * D, Hkv * D], dim=-1)
    else:  # a wrapped projection (adapters): compute it whole
        _, k, v = attn.qkv(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
    k, v = k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
    if ctx.cos is not None and ctx.sin is not None:
        k = apply_rope(k, ctx.cos, ctx.sin)  # (B, T, Hkv, D), as the attention layer rotates it
    assert ctx.input_pos is not None
    cache.update(ctx.input_pos, k.transpose(1, 2), v.transpose(1, 2))  # (B, Hkv, T, D)


def _check(model: LegoLM, input_ids: Tensor, max_new_tokens: int, kv_mode: str) -> None:
    if not model.extended:
        raise ConfigError("early-exit generation needs an extended LEGO model (two exits); run extend() first")
    if kv_mode not in KV_MODES:
        raise ConfigError(f"kv_mode must be one of {list(KV_MODES)}, got {kv_mode!r}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ConfigError("input_ids must be (batch, prompt_len) with at least one token, "
                          f"got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = input_ids.shape[1] + max_new_tokens
    if longest > model.config.block_size:
        raise ConfigError(f"prompt + max_new_tokens = {longest} exceeds the model's context of "
                          f"{model.config.block_size}; shorten the prompt or generate fewer tokens")


@torch.inference_mode()
def generate_with_early_exit(model: LegoLM, input_ids: Tensor, max_new_tokens: int,
                             routing_threshold: float | None, *, kv_mode: KVMode = "fill", greedy: bool = True,
                             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                             eos_id: int | None = None, output_logits: bool = False,
                             forced: Tensor | None = None) -> EarlyExitResult:
    """Continue ``input_ids`` (B, P) by ``max_new_tokens``, skipping the upper layers of confident tokens.

    Args:
        model: An extended `LegoLM` (eval mode).
        input_ids: Prompts of one length, (B, P) token ids.
        max_new_tokens: Tokens to generate per row.
        routing_threshold: τ in [0, 1]: exit where shallow confidence >= τ (1 = never, 0 = always).
            None runs the plain full-depth loop of the same code without the shallow exit (the
            baseline the speedup is measured against).
        kv_mode: ``fill`` (exact), ``skip`` or ``propagate``; see the module docstring.
        greedy: Argmax decoding; else sample with temperature / top_k / top_p.
        temperature: Sampling temperature.
        top_k: Sample among the k most likely tokens (0 = all).
        top_p: Nucleus mass (1.0 = off).
        seed: Seed of the sampling generator.
        eos_id: Stop a row at this id (the call ends when every row has); None = no stop.
        output_logits: Also return the logits each token was chosen from.
        forced: (B, max_new_tokens) tokens to emit instead of the chosen ones (teacher forcing):
            exits and logits are computed as in generation, so their log-probabilities score the
            decode path of a real text (see `decode_path_nll`).

    Returns:
        Tokens, exit flags, stats (counts, compute cost, wall time) and optional logits.
    """
    route = routing_threshold is not None
    if routing_threshold is not None:
        check_threshold(routing_threshold)
    _check(model, input_ids, max_new_tokens, kv_mode)
    if forced is not None and tuple(forced.shape) != (input_ids.shape[0], max_new_tokens):
        raise ConfigError(f"forced tokens must be (batch, max_new_tokens) = {(input_ids.shape[0], max_new_tokens)}, "
                          f"got {tuple(forced.shape)}")
    B, P = input_ids.shape
    N = max_new_tokens
    dec = _TwoCacheDecoder(model, B, P + N, kv_mode)
    gen = torch.Generator(device=dec.device).manual_seed(seed) if seed is not None else None
    sync: Callable[[], None] = torch.cuda.synchronize if dec.device.type == "cuda" else (lambda: None)

    def pick(logits: Tensor) -> Tensor:
        return next_token(logits, greedy, temperature, top_k, top_p, gen)

    tokens = torch.zeros(B, N, dtype=torch.long, device=dec.device)
    exited = torch.zeros(B, N, dtype=torch.bool, device=dec.device)
    kept = torch.zeros(B, N, dtype=torch.bool, device=dec.device)  # emitted before the row's EOS
    finished = torch.zeros(B, dtype=torch.bool, device=dec.device)
    saved: list[Tensor] = []
    sync()
    t0 = time.perf_counter()
    h_s, deep = dec.prefill(input_ids.to(dec.device))
    sync()
    t1 = time.perf_counter()
    steps = 0
    for t in range(N):
        if t > 0:  # feed the last token: lower layers, then the upper ones unless every row exits
            if eos_id is not None and bool(finished.all()):
                break
            steps += 1
            h_s = dec.lower(tokens[:, t - 1 : t], P + t - 1)
        shallow = model.shallow_head(h_s)[:, -1] if route else None  # (B, V)
        dec.macs += dec.head_macs if route and t > 0 else 0
        ex = exits(confidence(shallow), routing_threshold) if shallow is not None and routing_threshold is not None \
            else torch.zeros(B, dtype=torch.bool, device=dec.device)
        if t > 0 and bool((~ex & ~finished).any()):
            deep = dec.upper(h_s, P + t - 1)
        elif t > 0:
            dec.exited(h_s, P + t - 1)
            ex = torch.ones_like(ex)
        chosen = torch.where(ex[:, None], shallow, deep) if shallow is not None else deep  # (B, V)
        nxt = pick(chosen) if forced is None else forced[:, t].to(dec.device)
        kept[:, t] = ~finished
        if eos_id is not None:
            nxt = torch.where(finished, eos_id, nxt)
            finished |= nxt == eos_id
        tokens[:, t], exited[:, t] = nxt, ex
        if output_logits:
            saved.append(chosen.float())
    sync()
    t2 = time.perf_counter()
    n = steps + 1
    tokens, exited, kept = tokens[:, :n], exited[:, :n], kept[:, :n]
    shallow_count, total = int((exited & kept).sum()), int(kept.sum())
    L = model.n_layer
    stats = EarlyExitStats(
        shallow_count=shallow_count, deep_count=total - shallow_count, shallow_ratio=shallow_count / max(total, 1),
        decode_steps=steps, layer_calls=dec.layer_calls, prefill_layer_calls=L, token_layer_evals=dec.token_layers,
        actual_compute_cost=dec.token_layers / (steps * L) if steps else 1.0,
        call_cost=(dec.layer_calls - L) / (steps * L) if steps else 1.0, kv_projections=dec.kv_projections,
        macs_cost=dec.macs / (steps * dec.full_step_macs) if steps else 1.0,
        prefill_s=t1 - t0, decode_s=t2 - t1, wall_s=t2 - t0, kv_mode=kv_mode,
    )
    logits = torch.stack(saved, dim=1) if output_logits else None
    return EarlyExitResult(tokens, exited, stats, logits)


def decode_path_nll(model: LegoLM, ids: Tensor, prompt_len: int, routing_threshold: float,
                    kv_mode: KVMode = "fill") -> tuple[float, int, float]:
    """Teacher-forced NLL of ``ids[:, prompt_len:]`` along the early-exit decode path.

    Each token is scored by the exit generation would take for it, with the upper cache of
    ``kv_mode``; with ``fill`` this equals the hard-routed perplexity of a full forward pass, with
    ``skip``/``propagate`` it measures what their approximate caches cost in quality.

    Returns:
        (summed NLL, tokens scored, shallow ratio).
    """
    target = ids[:, prompt_len:]
    out = generate_with_early_exit(model, ids[:, :prompt_len], target.shape[1], routing_threshold, kv_mode=kv_mode,
                                   output_logits=True, forced=target)
    assert out.logits is not None
    logp = out.logits.log_softmax(-1).gather(-1, target.to(out.logits.device)[..., None])
    return -float(logp.double().sum()), target.numel(), out.stats.shallow_ratio


def block_weights(model: LegoLM) -> tuple[list[int], int]:
    """Weights each block and one exit head hold (what a batch-1 decode step reads per call), counted once
    while no module changes (`walk_once`)."""
    return walk_once(model, _block_weights)


def _block_weights(model: nn.Module) -> tuple[list[int], int]:
    assert isinstance(model, LegoLM)
    return [sum(p.numel() for p in b.parameters()) for b in model.blocks], model.lm_head.weight.numel()


def speculative_stats(model: LegoLM, d: int, rounds: int, accepted: int, tokens: int, prefill_s: float,
                      decode_s: float) -> EarlyExitStats:
    """Counts and costs of self-speculative decoding: per round d + 1 lower-block passes, d shallow heads,
    one pass of the upper blocks and the deep head; against full depth for every token after the first."""
    L, k = model.n_layer, model.split
    blocks, head = block_weights(model)
    steps = max(tokens - 1, 1)
    calls = rounds * ((d + 1) * k + (L - k))
    weights = rounds * ((d + 1) * sum(blocks[:k]) + d * head + sum(blocks[k:]) + head)
    return EarlyExitStats(
        shallow_count=0, deep_count=tokens, shallow_ratio=0.0, decode_steps=steps, layer_calls=calls + L,
        prefill_layer_calls=L, token_layer_evals=rounds * (d + 1) * L, actual_compute_cost=rounds * (d + 1) / steps,
        call_cost=calls / (steps * L), macs_cost=weights / (steps * (sum(blocks) + head)), kv_projections=0,
        prefill_s=prefill_s, decode_s=decode_s, wall_s=prefill_s + decode_s, rounds=rounds, drafted=rounds * d,
        accepted=accepted)


def check_speculative(model: LegoLM, input_ids: Tensor, max_new_tokens: int, draft_tokens: int) -> None:
    """`ConfigError` unless self-speculative decoding can run: two exits, d >= 1, room for the last round's drafts."""
    if draft_tokens < 1:
        raise ConfigError(f"draft_tokens must be >= 1, got {draft_tokens}")
    _check(model, input_ids, max_new_tokens, "fill")
    longest = input_ids.shape[1] + max_new_tokens + draft_tokens
    if longest > model.config.block_size:
        raise ConfigError(f"prompt + max_new_tokens + draft_tokens = {longest} exceeds the model's context of "
                          f"{model.config.block_size} (the last round drafts past the end); generate fewer tokens")


@torch.inference_mode()
def generate_speculative(model: LegoLM, input_ids: Tensor, max_new_tokens: int, draft_tokens: int,
                         eos_id: int | None = None) -> EarlyExitResult:
    """Self-speculative greedy decoding of one prompt (1, P) with torch ops (the reference of the fused one).

    Each round feeds the last token and ``draft_tokens`` greedy drafts of the drafter (`LegoLM.drafter`:
    the draft exit where phase 3 made one, else the shallow exit) through
    the lower layers (one KV cache of all layers), runs the upper layers once over those positions,
    and keeps the drafts up to the first one the deep exit disagrees with, plus the deep token
    there (LayerSkip, arXiv 2404.16710). The output equals full-depth greedy decoding.
    """
    check_speculative(model, input_ids, max_new_tokens, draft_tokens)
    if input_ids.shape[0] != 1:
        raise ConfigError(f"self-speculative decoding takes one prompt (batch 1), got {input_ids.shape[0]}")
    p0 = next(model.parameters())
    P, d, dev = input_ids.shape[1], draft_tokens, p0.device
    cache = KVCache(model.config, 1, P + max_new_tokens + d + 1, dtype=p0.dtype, device=dev)
    sync: Callable[[], None] = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    pos = torch.arange(P, device=dev)
    h_s = model.lower(input_ids.to(dev), cache=cache, input_pos=pos)
    out = [int(model.upper_last_logits(h_s, cache=cache, input_pos=pos).argmax(-1))]
    sync()
    t1 = time.perf_counter()
    rounds = accepted = 0
    n = P
    while len(out) < max_new_tokens and (eos_id is None or out[-1] != eos_id):
        tok, rows, drafts = out[-1], [], []
        for i in range(d + 1):
            h = model.lower(torch.tensor([[tok]], device=dev), cache=cache, input_pos=pos.new_tensor([n + i]))
            rows.append(h)
            if i < d:
                tok = int(model.draft_logits(h)[0, -1].argmax())
                drafts.append(tok)
        top = model.upper_hidden(torch.cat(rows, 1), cache=cache, input_pos=torch.arange(n, n + d + 1, device=dev))
        z = model.project(top)[0].argmax(-1).tolist()  # the deep token after each input
        j = next((i for i in range(d) if z[i] != drafts[i]), d)
        out += [*drafts[:j], z[j]]
        rounds, accepted, n = rounds + 1, accepted + j, n + j + 1
    sync()
    t2 = time.perf_counter()
    if eos_id is not None and eos_id in out:
        out = out[: out.index(eos_id) + 1]
    out = out[:max_new_tokens]
    stats = speculative_stats(model, d, rounds, accepted, len(out), t1 - t0, t2 - t1)
    tokens = torch.tensor([out], device=dev)
    return EarlyExitResult(tokens, torch.zeros_like(tokens, dtype=torch.bool), stats)

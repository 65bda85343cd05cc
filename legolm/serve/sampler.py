"""Per-request token choice in a shared batch: each row its own sampling settings, seed and logprobs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from legolm.generation.sampling import next_token


@dataclass(frozen=True)
class SamplingParams:
    """How one request chooses its tokens.

    Attributes:
        greedy: Take the argmax (temperature 0).
        temperature: Softmax temperature when sampling.
        top_k: Sample among the k most likely tokens (0 = all).
        top_p: Nucleus mass (1.0 = off).
        seed: Seed of the request's own generator (None = nondeterministic).
        logprobs: None = no log-probabilities; k >= 0 = the chosen token's and the k most likely ones'
            (of the model's distribution, before temperature and filtering).
    """

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int | None = None


@dataclass
class Choice:
    """One chosen token, with its log-probability and the top alternatives when asked for."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own generator: its draws do not depend on the other rows of the batch."""
    if params.greedy or params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def sample_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """One draw per row of ``logits`` (n, V), each row with its own temperature, top-k (0 = all) and top-p,
    in one batched pass from the global generator: rows sorted once, the k best kept, then the smallest
    prefix whose probability reaches p (as `legolm.generation.sampling.filter_logits`, ties at the k-th
    logit aside)."""
    x, order = (logits.float() / temperature[:, None]).sort(dim=-1, descending=True)
    ranks = torch.arange(x.shape[-1], device=x.device)[None, :]
    x = x.masked_fill((top_k[:, None] > 0) & (ranks >= top_k[:, None]), float("-inf"))
    probs = x.softmax(dim=-1)
    x = x.masked_fill((top_p[:, None] < 1.0) & (probs.cumsum(dim=-1) - probs >= top_p[:, None]), float("-inf"))
    return order.gather(-1, torch.multinomial(x.softmax(dim=-1), 1))[:, 0]


def pick(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
         ) -> list[Choice]:
    """Row i of ``logits`` (n, V) chooses with ``params[i]`` and ``generators[i]``.

    Greedy rows take the argmax; sampled rows without a seed are drawn together (`sample_rows`); a row
    with a seed draws alone from its own generator, as `legolm generate --seed` does for one prompt.
    """
    tokens = logits.argmax(dim=-1)
    batched = [i for i, p in enumerate(params) if not p.greedy and generators[i] is None]
    if batched:
        rows = [params[i] for i in batched]
        device = logits.device
        tokens[batched] = sample_rows(
            logits[batched], torch.tensor([p.temperature for p in rows], device=device),
            torch.tensor([p.top_k for p in rows], device=device), torch.tensor([p.top_p for p in rows], device=device))
    for i, p in enumerate(params):
        if not p.greedy and generators[i] is not None:
            tokens[i] = next_token(logits[i: i + 1], False, p.temperature, p.top_k, p.top_p, generators[i])[0]
    chosen: list[int] = tokens.tolist()
    choices = [Choice(t) for t in chosen]
    for i, p in enumerate(params):
        if p.logprobs is not None:
            lp = logits[i].float().log_softmax(dim=-1)
            choices[i].logprob = float(lp[chosen[i]])
            if p.logprobs > 0:
                values, ids = lp.topk(p.logprobs)
                choices[i].top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return choices

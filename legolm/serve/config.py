"""`ServeConfig`: every setting of `legolm serve` (each field is a flag: ``--max-batch 32``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from legolm.errors import ConfigError
from legolm.generation.generate import GenerationConfig
from legolm.generation.persistent import FusedKernel, PersistentShape, check_fused_kernel
from legolm.utils.device import DtypeName

_GEN = GenerationConfig()


@dataclass
class ServeConfig:
    """What to serve and how.

    Attributes:
        model: The model: a legolm/Hugging Face directory, .gguf file, or hub name.
        device: cpu, cuda, cuda:N or auto (CUDA when visible).
        dtype: Weights dtype (auto: bf16 on a GPU, fp32 on the CPU).
        host: Address to listen on (127.0.0.1 = this machine only; 0.0.0.0 = every interface).
        port: TCP port (0 = any free port; the chosen one is printed).
        served_model_name: The model id clients send (default: the model path's file or directory name).
        max_batch: Requests decoded together (rows of the batched KV cache; concurrent sessions of the
            batch-1 and memory decoders).
        max_context: Tokens of prompt + completion per request (capped at the model's context); the KV
            cache holds max_batch x max_context positions.
        context_bucket: A batched step attends over the longest request's positions rounded up to a
            multiple of this (one CUDA graph per rounded length).
        cuda_graph: Replay each batched step shape as a CUDA graph (CUDA only).
        fused: Plain models: decode each request through the fused batch-1 Triton step (CUDA graph),
            interleaved; LEGO models: the fused early-exit decoders.
        fused_attention_block: Cache slots per tile of the fused attention kernel (a power of two).
        fused_embed_block: Channels per tile of the fused embedding kernel (a power of two).
        fused_tune: Time the fused kernels' launch shapes at the first step on the GPU.
        fused_pdl: Programmatic dependent launch of the fused GEMV and attention kernels (where supported).
        fused_if_nodes: LEGO threshold early exit: each token's branch as an IF node of the captured graphs
            (`GenerationConfig.fused_if_nodes`; auto by default: IF nodes in skip mode, the host read in fill).
        fused_kernel: Plain models' fused step: blocks (five launches per block), splitk (three), splitk-exact
            (three, exact sums: the same bits on every run) or persistent (one).
        fused_persistent: Launch shape of the persistent step.
        early_exit: LEGO models: threshold or speculative decoding through the shallow exit (none = deep).
        threshold: Threshold early exit's tau (None: the model's calibrated one, or target_ratio's).
        target_ratio: Instead of tau: the fraction of tokens routed to the upper layers.
        kv_mode: Threshold mode's upper KV cache for exited tokens: skip, fill or propagate (None: the model's
            measured one, as in `legolm generate`: `GenerationConfig.kv_mode`).
        draft_tokens: Speculative mode: tokens drafted per verify pass.
        max_queue: Requests waiting for a free row beyond which new ones get HTTP 429.
        prefill_tokens_per_step: Prompt tokens prefilled between two decode steps (at least one request
            joins per step): bounds the pause a burst of long prompts causes the running streams.
        completion_max_tokens: max_tokens of /v1/completions when the request omits it (OpenAI's 16);
            chat requests default to the rest of the context.
        default_temperature: Sampling temperature when a request omits it (OpenAI's 1.0; greedy-only
            LEGO modes decode greedily then).
        chat_template: A Jinja chat template file to use instead of the model's own (or for a model
            without one).
        max_sessions: Memory sessions kept (least recently used ones beyond are dropped).
        max_stop: Stop strings per request.
        max_logprobs: Most alternatives a request may ask logprobs for.
        disconnect_poll_s: How often a waiting non-streaming request checks that its client is still there.
        engine_poll_s: How long the idle engine waits for a request before checking for shutdown.
        log_level: uvicorn's log level (info logs each request).
    """

    model: str = ""
    device: str = "auto"
    dtype: DtypeName = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    max_batch: int = 16
    max_context: int = 2048
    context_bucket: int = 256
    cuda_graph: bool = True
    fused: bool = False
    fused_attention_block: int = _GEN.fused_attention_block  # the decoder settings default as in `generate`
    fused_embed_block: int = _GEN.fused_embed_block
    fused_tune: bool = _GEN.fused_tune
    fused_pdl: bool = _GEN.fused_pdl
    fused_if_nodes: bool | None = _GEN.fused_if_nodes
    fused_kernel: FusedKernel = _GEN.fused_kernel
    fused_persistent: PersistentShape = field(default_factory=PersistentShape)
    early_exit: Literal["none", "threshold", "speculative"] = "none"
    threshold: float | None = None
    target_ratio: float | None = None
    kv_mode: Literal["fill", "skip", "propagate"] | None = _GEN.kv_mode
    draft_tokens: int = _GEN.draft_tokens
    max_queue: int = 256
    prefill_tokens_per_step: int = 4096
    completion_max_tokens: int = 16
    default_temperature: float = 1.0
    chat_template: str | None = None
    max_sessions: int = 1024
    max_stop: int = 4
    max_logprobs: int = 20
    disconnect_poll_s: float = 0.5
    engine_poll_s: float = 0.1
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    def validate(self) -> None:
        """Raise `ConfigError` naming the first bad setting."""
        checks = [
            (bool(self.model), "give --model (a legolm/Hugging Face directory, .gguf file or hub name)"),
            (0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}"),
            (self.max_batch >= 1, f"max_batch must be >= 1, got {self.max_batch}"),
            (self.max_context >= 2, f"max_context must be >= 2 (a prompt token and a new one), got {self.max_context}"),
            (self.context_bucket >= 1, f"context_bucket must be >= 1, got {self.context_bucket}"),
            (self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}"),
            (self.prefill_tokens_per_step >= 1, f"prefill_tokens_per_step must be >= 1, got "
                                                f"{self.prefill_tokens_per_step}"),
            (self.completion_max_tokens >= 1, f"completion_max_tokens must be >= 1, got {self.completion_max_tokens}"),
            (self.default_temperature >= 0, f"default_temperature must be >= 0, got {self.default_temperature}"),
            (self.max_sessions >= 1, f"max_sessions must be >= 1, got {self.max_sessions}"),
            (self.max_stop >= 0, f"max_stop must be >= 0, got {self.max_stop}"),
            (self.max_logprobs >= 0, f"max_logprobs must be >= 0, got {self.max_logprobs}"),
            (self.disconnect_poll_s > 0, f"disconnect_poll_s must be > 0, got {self.disconnect_poll_s}"),
            (self.engine_poll_s > 0, f"engine_poll_s must be > 0, got {self.engine_poll_s}"),
        ]
        for name in ("fused_attention_block", "fused_embed_block"):
            value = getattr(self, name)
            checks.append((value >= 1 and not value & (value - 1), f"{name} must be a power of two, got {value}"))
        check_fused_kernel(self.fused_kernel, self.fused_persistent, self.early_exit)
        exit_only = [f"--{n.replace('_', '-')}" for n in ("threshold", "target_ratio") if getattr(self, n) is not None]
        checks.append((self.early_exit != "none" or not exit_only,
                       f"{' and '.join(exit_only)} set without --early-exit threshold: add it, or drop the flag"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

"""The OpenAI wire format: request bodies (checked strictly) and the JSON of responses and stream chunks.

Requests are pydantic models that forbid unknown fields, so a typo is a 400 naming the field, not a
silently ignored setting. Beyond OpenAI's fields a request may send ``top_k`` (0 or -1 = off),
``ignore_eos`` and ``session`` (a memory session, memory-layer models). Fields OpenAI defines but
legolm does not implement are accepted only at their neutral value (``n`` = 1, penalties 0, no
``logit_bias``, no ``suffix``); anything else is a 400 that says so.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SESSION_ID_PATTERN = r"^[A-Za-z0-9._~-]{1,128}$"  # URL-safe without escaping
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
MAX_CHAT_LOGPROBS = 20  # ... and for /v1/chat/completions
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class GenerationRequest(_Strict):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    session: str | None = Field(None, pattern=SESSION_ID_PATTERN)
    ignore_eos: bool = False

    def unsupported(self) -> ApiError | None:
        """The first field set to a value legolm does not implement."""
        checks = [("n", self.n == 1, "n > 1 is not supported: send one request per completion"),
                  ("presence_penalty", self.presence_penalty == 0, "presence_penalty is not supported (send 0)"),
                  ("frequency_penalty", self.frequency_penalty == 0, "frequency_penalty is not supported (send 0)"),
                  ("logit_bias", not self.logit_bias, "logit_bias is not supported"),
                  ("stream_options", self.stream or self.stream_options is None,
                   "stream_options is only allowed with stream: true")]
        for param, ok, message in checks:
            if not ok:
                return ApiError(400, message, param=param)
        return None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> ApiError | None:
        if self.best_of not in (None, 1):
            return ApiError(400, "best_of > 1 is not supported", param="best_of")
        if self.suffix:
            return ApiError(400, "suffix (insertion) is not supported", param="suffix")
        if self.echo and self.logprobs is not None:
            return ApiError(400, "echo with logprobs (prompt log-probabilities) is not supported", param="echo")
        return super().unsupported()


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_CHAT_LOGPROBS)

    def unsupported(self) -> ApiError | None:
        if self.top_logprobs is not None and not self.logprobs:
            return ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            return ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        return super().unsupported()


def validation_error(err: ValidationError) -> ApiError:
    """The first problem of a request body as one 400 naming the field."""
    first = err.errors()[0]
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
    param = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field {path!r} (not part of the request format)", param=param,
                        code="unknown_field")
    return ApiError(400, f"{path}: {first['msg']}" if path else str(first["msg"]), param=param)


# -- responses ---------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, choices: list[dict[str, Any]],
             usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """The object around choices: text_completion, chat.completion or chat.completion.chunk."""
    out: dict[str, Any] = {"id": rid, "object": kind, "created": int(time.time()), "model": model,
                           "choices": choices}
    if usage_ is not None or kind in ("text_completion", "chat.completion"):
        out["usage"] = usage_
    return out


def completion_choice(text: str, finish: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_choice(text: str, finish: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish}


def chat_delta(delta: dict[str, Any], finish: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

"""Chat templates: the model's own Jinja template (GGUF metadata or Hugging Face tokenizer files) turns
chat messages into the prompt text, as `transformers`' ``apply_chat_template`` does.

Where the template comes from, first found: ``--chat-template FILE``; a GGUF file's
``tokenizer.chat_template``; a model directory's ``chat_template.jinja``, or the ``chat_template``
of its ``tokenizer_config.json`` (a string, or a list of named templates: "default" is taken).
Templates run in Jinja's immutable sandbox with ``raise_exception`` and ``strftime_now``, and get
``messages``, ``add_generation_prompt=True``, ``bos_token`` and ``eos_token``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from legolm.data.tokenizer import Tokenizer
from legolm.errors import ConfigError, LegolmError


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: The Jinja text.
        tokenizer: Gives the ``bos_token`` / ``eos_token`` strings the template may print.
    """

    def __init__(self, source: str, tokenizer: Tokenizer) -> None:
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ConfigError("chat templates need Jinja2: pip install 'legolm[serve]'") from None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as err:
            raise ConfigError(f"the chat template does not compile ({err})") from None
        self._errors: tuple[type[Exception], ...] = (jinja2.TemplateError,)
        self.source = source
        self.bos = _token(tokenizer, tokenizer.bos_id)
        self.eos = _token(tokenizer, tokenizer.eos_id)

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        """The prompt text of ``messages`` ({"role", "content"} each), ending where the assistant's reply starts.

        Raises:
            LegolmError: The template refused the messages (e.g. roles out of order).
        """
        try:
            return str(self.template.render(messages=list(messages), add_generation_prompt=True,
                                            bos_token=self.bos, eos_token=self.eos))
        except self._errors as err:
            raise LegolmError(f"the chat template refused these messages ({err})") from None


def _raise(message: str) -> None:
    raise LegolmError(message)


def _token(tokenizer: Tokenizer, token_id: int | None) -> str:
    if token_id is None:
        return ""
    return str(tokenizer.backend.id_to_token(token_id) or "")


def load_chat_template(tokenizer: Tokenizer, override: str | None = None) -> ChatTemplate | None:
    """The template to serve chat with: ``override`` (a file) if given, else the one stored with the model's
    tokenizer (``Tokenizer.chat_template``, read with it); None without one.

    Raises:
        ConfigError: ``override`` cannot be read, or a template does not compile.
    """
    if override is not None:
        try:
            source: str | None = Path(override).read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read the chat template {override} ({err.strerror})") from None
    else:
        source = tokenizer.chat_template
    return ChatTemplate(source, tokenizer) if source else None

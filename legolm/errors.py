"""User-facing errors.

Every mistake a user can make (a wrong path, a bad config, a broken checkpoint) raises a
`LegolmError` whose message is one line naming the problem and the fix. The CLI prints it and
exits with status 2, without a traceback; library users catch it like any exception.
"""

from __future__ import annotations


class LegolmError(Exception):
    """A problem with the user's input, reported in one line (CLI exit status 2)."""


class ConfigError(LegolmError):
    """An invalid model, generation or training setting."""


class CheckpointError(LegolmError):
    """A checkpoint that is missing, unsupported, truncated or does not match its config."""


class TokenizerError(CheckpointError):
    """A checkpoint whose tokenizer is missing or unreadable (its weights may still load)."""


class TrainingDiverged(LegolmError):
    """A non-finite loss, gradient norm or weight stopped a training run (nothing non-finite was saved)."""

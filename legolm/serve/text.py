"""Token ids to text as they arrive: incremental detokenization and stop strings.

Decoding one token at a time breaks multi-byte characters (a byte-level token may hold half of
one) and, for some tokenizers, spaces that depend on the token before. `TextStream` decodes a
short window of recent tokens and appends only the part that is new and complete (the approach of
vLLM's detokenizer), then looks for the request's stop strings in the text. What it hands out
(`TextStream.ready`) holds back a tail that could still become a stop string, so no streamed
chunk ever contains part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from legolm.data.tokenizer import Tokenizer

INCOMPLETE = "\ufffd"  # what a decoder yields for the first bytes of a character split across tokens


class TextStream:
    """The text of one request's new tokens.

    Args:
        tokenizer: Decodes the ids (special tokens dropped).
        stops: Strings that end the text (the first one found; it is not part of the text).
    """

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.text = ""
        self.stop_at: int | None = None  # where the first stop string starts in ``text``
        self.sent = 0
        self._prefix = self._read = 0  # ids[_prefix:_read] was decoded last time, ids[_read:] is new
        self._longest = max((len(s) for s in self.stops), default=0)

    def push(self, token: int) -> bool:
        """Add a token; True when a stop string has completed (the text then ends before it)."""
        self.ids.append(token)
        if self.stop_at is not None:
            return True
        before = self.tokenizer.decode(self.ids[self._prefix: self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(INCOMPLETE):
            searched = len(self.text)
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self._find_stop(max(0, searched - self._longest + 1))
        return self.stop_at is not None

    def _find_stop(self, start: int) -> None:
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.stop_at = min(found)

    def final(self) -> str:
        """The whole text (all ids decoded at once), cut before the first stop string."""
        text = self.tokenizer.decode(self.ids)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return text[: min(found)] if found else text

    def ready(self, finished: bool) -> str:
        """The text not handed out yet that is safe to send: while unfinished, a tail that could begin
        a stop string is held back; when finished, everything up to the stop (or the end)."""
        if finished:
            text = self.final()
            end = len(text)
        else:
            text = self.text if self.stop_at is None else self.text[: self.stop_at]
            end = len(text) if self.stop_at is not None else len(text) - self._held(text)
        chunk = text[self.sent: end]
        self.sent = max(self.sent, end)
        return chunk

    def _held(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        for n in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

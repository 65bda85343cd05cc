"""Memory sessions: the memory state of a conversation with a memory-layer model, kept by the server.

A request that names a session starts from the session's memory (empty for a new one) and, when it
finishes, leaves the memory of its prompt and completion there (see `legolm.generation.memory_decode`).
Each session serves one request at a time; its memory can be downloaded and uploaded as the
fingerprinted file of `legolm.layers.memory_state`, so a conversation moves between servers.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from torch import Tensor

from legolm.errors import LegolmError

State = dict[str, Tensor]


class SessionBusy(LegolmError):
    """The session is in use by a running request."""


class UnknownSession(LegolmError):
    """No session of that id is stored."""


class SessionStore:
    """Memory states by session id, least recently used dropped beyond ``max_sessions``; thread-safe.

    Args:
        max_sessions: Sessions kept.
    """

    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._states: OrderedDict[str, State] = OrderedDict()
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self.evicted = 0

    def acquire(self, session: str) -> State | None:
        """Reserve ``session`` for a request; its memory (None for a new session).

        Raises:
            SessionBusy: Another request holds it.
        """
        with self._lock:
            if session in self._busy:
                raise SessionBusy(f"session {session!r} is in use by another request; send one request per "
                                  "session at a time")
            self._busy.add(session)
            state = self._states.get(session)
            if state is not None:
                self._states.move_to_end(session)
            return state

    def release(self, session: str, state: State | None) -> None:
        """End a request's hold; store ``state`` as the session's memory (None: keep the old one)."""
        with self._lock:
            self._busy.discard(session)
            if state is not None:
                self._put(session, state)

    def get(self, session: str) -> State:
        """The session's memory.

        Raises:
            UnknownSession: No memory is stored under ``session``.
        """
        with self._lock:
            if session not in self._states:
                raise UnknownSession(f"no memory session {session!r} on this server")
            self._states.move_to_end(session)
            return self._states[session]

    def put(self, session: str, state: State) -> None:
        """Replace the session's memory (an upload).

        Raises:
            SessionBusy: A request holds the session.
        """
        with self._lock:
            if session in self._busy:
                raise SessionBusy(f"session {session!r} is in use by a running request; upload after it finishes")
            self._put(session, state)

    def delete(self, session: str) -> None:
        """Forget the session.

        Raises:
            UnknownSession: No memory is stored under ``session``.
            SessionBusy: A request holds it.
        """
        with self._lock:
            if session in self._busy:
                raise SessionBusy(f"session {session!r} is in use by a running request")
            if self._states.pop(session, None) is None:
                raise UnknownSession(f"no memory session {session!r} on this server")

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)

    def _put(self, session: str, state: State) -> None:
        self._states[session] = state
        self._states.move_to_end(session)
        while len(self._states) > self.max_sessions:
            oldest = next((s for s in self._states if s not in self._busy and s != session), None)
            if oldest is None:  # every other session is in use: keep them all for now
                return
            del self._states[oldest]
            self.evicted += 1

"""Browser sessions of the UI: a login with an API token makes a session, kept in this
process only (a restart logs every browser out), which the session cookie names.

Sits under zcore.site.ui.gate.  A session holds the token's secret, so every request
made with it is still checked by the API's gate (a revoked token ends its sessions at
once), and its CSRF token, which every state-changing request must echo in a header.
Sessions end after `idle_seconds` without use; at most `max_sessions` are kept (the
least recently used goes first).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

DEFAULT_IDLE_SECONDS = 12 * 3600.0
DEFAULT_MAX_SESSIONS = 10_000


@dataclass
class Session:
    """One logged-in browser: the API token it acts with and its CSRF token."""

    token: str
    name: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    used_at: float = field(default_factory=time.monotonic)

    def csrf_matches(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(),
                                                             self.csrf.encode())


class SessionStore:
    """Session ids (the cookie's value) to sessions; thread-safe."""

    def __init__(self, idle_seconds: float = DEFAULT_IDLE_SECONDS,
                 max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        self.idle_seconds = idle_seconds
        self.max_sessions = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def create(self, token: str, name: str) -> tuple[str, Session]:
        """A new session for `token`: its id and the session."""
        sid = secrets.token_urlsafe(32)
        session = Session(token, name)
        with self._lock:
            self._sessions[sid] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        """The live session `sid` names (its idle time restarts), or None."""
        if not sid:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:
                return None
            if now - session.used_at > self.idle_seconds:
                del self._sessions[sid]
                return None
            session.used_at = now
            self._sessions.move_to_end(sid)
            return session

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

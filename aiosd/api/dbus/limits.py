"""What bus clients may make the daemon hold: calls in flight, bounded per user.

A call is in flight from the moment it is admitted until it is answered; a request object
(``StartChat``) counts as one call until it has ended.  Each uid other than an
administrator's may have ``dbus.max_calls_per_user`` in flight, over all its connections;
everyone together ``dbus.max_calls``, of which the last ``dbus.admin_reserved_calls`` only
administrators may take, so that no user can lock them out.
"""

from __future__ import annotations

import collections
import threading

from aiosd.config import DBusConfig
from aiosd.errors import TooManyRequests


class CallLimits:
    """Counts calls in flight by uid (safe to use from any thread)."""

    def __init__(self, cfg: DBusConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._total = 0

    def admit(self, uid: int, admin: bool) -> TooManyRequests | None:
        """Count one more call of ``uid``; or the limit it would exceed (nothing counted)."""
        cfg = self.cfg
        with self._lock:
            if not admin:
                mine = self._per_uid[uid]
                if mine >= cfg.max_calls_per_user:
                    return TooManyRequests(
                        f"uid {uid} already has {mine} D-Bus calls in flight "
                        "(dbus.max_calls_per_user); a request object counts until it has ended",
                        data={"limit": cfg.max_calls_per_user, "scope": "user"},
                    )
                shared = cfg.max_calls - cfg.admin_reserved_calls
                if self._total >= shared:
                    return TooManyRequests(
                        f"the daemon already has {self._total} D-Bus calls in flight; the last "
                        f"{cfg.admin_reserved_calls} are kept for administrators "
                        "(dbus.max_calls, dbus.admin_reserved_calls)",
                        data={"limit": shared, "scope": "users"},
                    )
            if self._total >= cfg.max_calls:
                return TooManyRequests(
                    f"the daemon already has {cfg.max_calls} D-Bus calls in flight "
                    "(dbus.max_calls)",
                    data={"limit": cfg.max_calls, "scope": "daemon"},
                )
            self._per_uid[uid] += 1
            self._total += 1
        return None

    def release(self, uid: int) -> None:
        """One call of ``uid`` has been answered."""
        with self._lock:
            self._total -= 1
            self._per_uid[uid] -= 1
            if not self._per_uid[uid]:
                del self._per_uid[uid]

    def in_flight(self) -> int:
        """Calls in flight, everyone's."""
        with self._lock:
            return self._total

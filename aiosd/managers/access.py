"""Access manager, first cut: roles from Unix identity, default deny, audit.

Roles: ``admin`` — root, or a member of ``access.admin_group``; ``user`` — a member of
``access.user_group``, or anyone when ``access.open_to_all`` is set; nobody else may use the
daemon.  A syscall without a declared permission is refused for everyone.
"""

from __future__ import annotations

import grp
import logging
from dataclasses import dataclass, field
from enum import StrEnum

from aiosd.config import AccessConfig
from aiosd.errors import PermissionDenied
from aiosd.managers import audit

log = logging.getLogger(__name__)


class Role(StrEnum):
    """What a caller may do, from least to most."""

    none = "none"
    user = "user"
    admin = "admin"


class Permission(StrEnum):
    """The role a syscall requires; declared in the syscall table."""

    user = "user"
    admin = "admin"


@dataclass(frozen=True)
class Caller:
    """Who is calling, as the kernel sees the peer — never taken from the payload."""

    uid: int
    gid: int
    pid: int
    groups: frozenset[int] = field(default_factory=frozenset)
    aid: str | None = None
    #: The client session (one socket connection, one bus connection): the default scope of
    #: short-term memory.  Set by the transport, never by the payload.
    session: str | None = None

    def in_group(self, gid: int | None) -> bool:
        """Whether the caller's primary or supplementary groups include ``gid``."""
        return gid is not None and (gid == self.gid or gid in self.groups)


def _gid_of(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


class AccessManager:
    """Decides who may make which syscall, and records every decision."""

    def __init__(self, cfg: AccessConfig) -> None:
        # At construction, before the event loop serves anyone: a direct look-up is fine.
        self.configure(cfg, _gid_of(cfg.admin_group), _gid_of(cfg.user_group))

    def configure(self, cfg: AccessConfig, admin_gid: int | None, user_gid: int | None) -> None:
        """Apply (or re-apply on reload) the [access] settings, with their groups' gids
        (None: no such group) looked up by the caller."""
        self.cfg = cfg
        self._admin_gid = admin_gid
        self._user_gid = user_gid
        if self._user_gid is None and not cfg.open_to_all:
            log.warning(
                "group %r does not exist: only root and %r members can use the daemon",
                cfg.user_group,
                cfg.admin_group,
            )

    def gids(self) -> tuple[int | None, int | None]:
        """The admin and user groups' gids in use (None: no such group)."""
        return self._admin_gid, self._user_gid

    def role(self, caller: Caller) -> Role:
        """The caller's role, looked up from its uid and groups."""
        if caller.uid == 0 or caller.in_group(self._admin_gid):
            return Role.admin
        if self.cfg.open_to_all or caller.in_group(self._user_gid):
            return Role.user
        return Role.none

    def authorize(self, syscall: str, permission: Permission | None, role: Role) -> None:
        """Raise PermissionDenied unless a caller of ``role`` may make ``syscall``.

        ``role`` is the caller's role, already looked up for this call; callers without one
        are refused before this (kernel/dispatch.py).
        """
        if permission is None:
            raise PermissionDenied(f"{syscall} declares no permission and is refused")
        if permission is Permission.admin and role is not Role.admin:
            raise PermissionDenied(
                f"{syscall} is for administrators: root or members of {self.cfg.admin_group!r}"
            )

    def refusal(self, caller: Caller) -> PermissionDenied:
        """The error for a caller who has no role at all."""
        return PermissionDenied(
            f"uid {caller.uid} may not use aiosd: it is not root and not a member of "
            f"group {self.cfg.user_group!r} or {self.cfg.admin_group!r}"
        )

    def audit(self, caller: Caller, syscall: str, verdict: str, detail: str = "") -> None:
        """Record one decision with the caller's identity (see managers/audit.py)."""
        audit.record(caller.uid, caller.pid, caller.aid, syscall, verdict, detail)

"""Who a user or a process is: NSS look-ups off the event loop and cached; /proc reads.

``pwd`` and ``grp`` go through NSS, which may be sssd or LDAP over the network: a look-up can
take seconds.  Made on the event loop, that would stall every client (and the watchdog would
kill the daemon), so look-ups run in a small thread pool of their own; answers are kept for
``ttl`` seconds (misses for ``negative_ttl``) and concurrent look-ups of one name share one
query.
"""

from __future__ import annotations

import asyncio
import grp
import pwd
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar, cast

from aiosd.osbridge.executor import UnixAccount

K = TypeVar("K")
V = TypeVar("V")


def _uid(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


@dataclass(frozen=True)
class ProcessIds:
    """A process's uids, effective gid and supplementary groups, as the kernel has them."""

    gid: int | None
    groups: frozenset[int]
    #: Its real and effective uid, from the same read: whoever holds the pid now owns the
    #: gid and groups above (a pid may have been reused since it was given).
    uids: tuple[int, int] | None = None


def process_ids(pid: int) -> ProcessIds:
    """Read ``/proc/PID/status``: a local read of the kernel's record, never NSS.

    A process that is gone gives no uids, no gid and no groups.
    """
    uids: tuple[int, int] | None = None
    gid: int | None = None
    groups: frozenset[int] = frozenset()
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                # Uid: and Gid: list real, effective, saved, filesystem.
                if line.startswith("Uid:"):
                    real, effective = line.split()[1:3]
                    uids = (int(real), int(effective))
                elif line.startswith("Gid:"):
                    gid = int(line.split()[2])
                elif line.startswith("Groups:"):
                    groups = frozenset(int(g) for g in line.split()[1:])
                    break
    except (OSError, ValueError, IndexError):
        return ProcessIds(None, frozenset())
    return ProcessIds(gid, groups, uids)


class UserDirectory:
    """Cached NSS answers: user name → uid, group name → gid, gid → group name."""

    def __init__(
        self, ttl: float = 60.0, negative_ttl: float = 10.0, max_entries: int = 4096
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[str, object], tuple[float, object]] = OrderedDict()
        self._pending: dict[tuple[str, object], asyncio.Future[object]] = {}
        self._executor: ThreadPoolExecutor | None = None

    async def uid_of(self, name: str) -> int | None:
        """The uid of user ``name``, or None if there is no such user."""
        return await self._lookup("uid", name, _uid)

    async def gid_of(self, name: str, fresh: bool = False) -> int | None:
        """The gid of group ``name``, or None if there is no such group; ``fresh`` asks NSS
        even when an answer is cached (a reload must see a group made a moment ago)."""
        return await self._lookup("gid", name, _gid, fresh)

    async def account(self, uid: int) -> UnixAccount:
        """The account of ``uid`` as of now (groups included: never cached, a user's groups
        change); NotFound if there is none."""
        return await self._lookup("account", uid, UnixAccount.of, fresh=True)

    async def group_name(self, gid: int) -> str | None:
        """The name of group ``gid``, or None if it has none."""
        return await self._lookup("group", gid, _group_name)

    async def _lookup(self, kind: str, key: K, fn: Callable[[K], V], fresh: bool = False) -> V:
        ck = (kind, key)
        now = time.monotonic()
        hit = None if fresh else self._cache.get(ck)
        if hit is not None and hit[0] > now:
            return cast(V, hit[1])
        pending = self._pending.get(ck)
        if pending is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nss")
            loop = asyncio.get_running_loop()
            pending = cast("asyncio.Future[object]", loop.run_in_executor(self._executor, fn, key))
            self._pending[ck] = pending
            pending.add_done_callback(lambda f: self._store(ck, f))
        # Shielded: one caller giving up does not cancel the query the others wait for.
        return cast(V, await asyncio.shield(pending))

    def _store(self, ck: tuple[str, object], fut: asyncio.Future[object]) -> None:
        self._pending.pop(ck, None)
        if fut.cancelled() or fut.exception() is not None:
            return
        value = fut.result()
        ttl = self.ttl if value is not None else self.negative_ttl
        self._cache[ck] = (time.monotonic() + ttl, value)
        self._cache.move_to_end(ck)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)

    def close(self) -> None:
        """Stop the look-up threads (a look-up still running finishes in its thread)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

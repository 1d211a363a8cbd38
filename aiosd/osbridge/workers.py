"""User workers, from the daemon's side: started as the user, kept warm, bounded, restarted.

A worker (:mod:`aiosd.osbridge.worker`) is a process of one user that does their tool work
with their rights.  The pool keeps at most ``tools.workers_per_user`` per user and
``tools.max_workers`` in all (the last ``admin_reserved_workers`` places for
administrators); a call takes an idle worker of its user, starts one if there is room, or
waits for one to be free.  A worker idle for ``worker_idle_timeout`` seconds is stopped; when
the pool is full, the user who needs one takes the place of the longest-idle worker of
someone else.  A worker that dies, answers garbage or overruns its call's timeout is killed
(its whole process group) and forgotten: the next call starts a fresh one.

Workers are started like agents of the subprocess backend: through
:func:`aiosd.osbridge.executor.confined_argv` (setpriv: the user's uid, gid and groups, no
capabilities, no new privileges, SIGKILL when the daemon dies), in a session of their own,
from the event loop's thread, with a clean environment and umask 077.  Before its first
call, a new worker must say who it is (``worker.whoami``): a worker that is not the user it
was started as is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from aiosd.config import ToolsConfig
from aiosd.errors import BackendUnavailable, Busy
from aiosd.osbridge.executor import AccountRef, UnixAccount, start_piped, user_environment

log = logging.getLogger(__name__)

#: Seconds a new worker has to start and say who it is.
START_TIMEOUT = 15.0
#: Bytes of a worker's stderr kept for the message when it fails.
STDERR_KEPT = 4096


class WorkerFailed(Exception):
    """The worker could not answer (it died, timed out, or answered garbage); it is gone."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class Worker:
    """One running worker of one user."""

    def __init__(self, account: UnixAccount, proc: asyncio.subprocess.Process) -> None:
        self.account = account
        self.proc = proc
        self.pid = proc.pid
        self.busy = False
        self.idle_since = time.monotonic()
        self.ids = itertools.count(1)
        self.stderr = b""
        self._stderr_task = asyncio.get_running_loop().create_task(self._read_stderr())

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(4096):
            self.stderr = (self.stderr + chunk)[-STDERR_KEPT:]
            log.debug(
                "tool worker %d (%s): %s",
                self.pid,
                self.account.name,
                chunk.decode(errors="replace").rstrip(),
            )

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def request(self, op: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """One request and its answer (``result`` or ``error``); WorkerFailed if none came."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        rid = next(self.ids)
        line = json.dumps({"id": rid, "op": op, "args": args}).encode() + b"\n"
        try:
            async with asyncio.timeout(timeout):
                self.proc.stdin.write(line)
                await self.proc.stdin.drain()
                raw = await self.proc.stdout.readline()
        except TimeoutError:
            self.kill()
            raise WorkerFailed(f"no answer within {timeout:g} s", timed_out=True) from None
        except (ValueError, asyncio.LimitOverrunError):
            self.kill()
            raise WorkerFailed("its answer was larger than tools.max_output_bytes") from None
        except (ConnectionError, BrokenPipeError) as exc:
            self.kill()
            raise WorkerFailed(f"it is gone ({exc})") from None
        if not raw:
            self.kill()
            await self._ended()
            raise WorkerFailed(f"it ended ({self._why()})")
        try:
            reply = json.loads(raw)
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or reply.get("id") != rid:
            self.kill()
            raise WorkerFailed("it answered something that is not its answer")
        return reply

    async def _ended(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await self.proc.wait()
                await self._stderr_task

    def _why(self) -> str:
        code = self.proc.returncode
        how = (
            f"killed by {signal.Signals(-code).name}"
            if code is not None and code < 0
            else f"exit status {code}"
        )
        said = self.stderr.decode(errors="replace").strip().splitlines()
        return f"{how}: {said[-1]}" if said else how

    def kill(self) -> None:
        """SIGKILL to the worker's whole process group (it is its session's leader)."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)

    async def close(self) -> None:
        """End the worker: its stdin closes (it exits), then SIGKILL if it lingers."""
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(2.0):
                await self.proc.wait()
        except TimeoutError:
            self.kill()
            await self._ended()
        self._stderr_task.cancel()


class WorkerPool:
    """Every user's workers."""

    def __init__(
        self,
        cfg: Callable[[], ToolsConfig],
        python: str = sys.executable,
    ) -> None:
        #: () → the current [tools] section (a reload changes the bounds live).
        self._cfg = cfg
        self.python = python
        self._by_uid: dict[int, list[Worker]] = {}
        self._starting: dict[int, int] = {}
        self._freed = asyncio.Condition()
        self._reaper: asyncio.Task[None] | None = None
        self.closed = False

    # --- counts ---------------------------------------------------------------------------------

    def count(self, uid: int | None = None) -> int:
        """Workers running (or starting) for ``uid``, or in all."""
        if uid is not None:
            return len(self._by_uid.get(uid, ())) + self._starting.get(uid, 0)
        return sum(len(w) for w in self._by_uid.values()) + sum(self._starting.values())

    # --- calls ----------------------------------------------------------------------------------

    async def call(
        self, account: AccountRef, admin: bool, op: str, args: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """Run ``op`` in one of ``account``'s workers: the worker's answer (``result`` or
        ``error``).  WorkerFailed if the worker failed; Busy if no place frees in time."""
        if self.closed:
            raise BackendUnavailable("the tool workers are stopped (the daemon is stopping)")
        deadline = time.monotonic() + timeout
        worker = await self._take(account, admin, deadline)
        try:
            return await worker.request(op, args, max(0.001, deadline - time.monotonic()))
        finally:
            await self._give_back(worker)

    async def _take(self, account: AccountRef, admin: bool, deadline: float) -> Worker:
        uid = account.uid
        async with self._freed:
            while True:
                for w in list(self._by_uid.get(uid, ())):
                    if not w.alive and not w.busy:
                        self._forget(w)  # died while idle: its place is free
                for w in self._by_uid.get(uid, ()):
                    if not w.busy and w.alive:
                        w.busy = True
                        return w
                cfg = self._cfg()
                if self.count(uid) < cfg.workers_per_user:
                    room = cfg.max_workers - (0 if admin else cfg.admin_reserved_workers)
                    if self.count() < room or self._evict_idle(uid):
                        break
                    if self.count(uid) == 0:
                        raise Busy(
                            f"all {cfg.max_workers} tool workers are busy "
                            "(tools.max_workers); try again shortly"
                        )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Busy(
                        f"your {self.count(uid)} tool workers stayed busy "
                        "(tools.workers_per_user); try again shortly"
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._freed.wait()
            self._starting[uid] = self._starting.get(uid, 0) + 1
        try:
            w = await self._start(await account.get(), deadline)
        finally:
            async with self._freed:
                self._starting[uid] -= 1
                if not self._starting[uid]:
                    del self._starting[uid]
                self._freed.notify_all()
        w.busy = True
        self._by_uid.setdefault(uid, []).append(w)
        return w

    def _evict_idle(self, uid: int) -> bool:
        """Stop the longest-idle worker of another user to make room; whether there was one."""
        idle = [w for u, ws in self._by_uid.items() if u != uid for w in ws if not w.busy]
        if not idle:
            return False
        oldest = min(idle, key=lambda w: w.idle_since)
        self._forget(oldest)
        asyncio.get_running_loop().create_task(oldest.close())
        return True

    def _forget(self, w: Worker) -> None:
        ws = self._by_uid.get(w.account.uid, [])
        if w in ws:
            ws.remove(w)
            if not ws:
                del self._by_uid[w.account.uid]

    async def _give_back(self, w: Worker) -> None:
        async with self._freed:
            w.busy = False
            w.idle_since = time.monotonic()
            if not w.alive or self.closed:
                self._forget(w)
                if self.closed:
                    await w.close()
            self._freed.notify_all()
        self._arm_reaper()

    async def _start(self, account: UnixAccount, deadline: float) -> Worker:
        env = user_environment(
            account,
            {},
            {
                "XDG_RUNTIME_DIR": f"/run/user/{account.uid}",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
            },
        )
        limit = self._cfg().max_output_bytes * 2 + 65536
        try:
            proc = await start_piped(
                account, [self.python, "-I", "-m", "aiosd.osbridge.worker"], env, limit
            )
        except OSError as exc:
            raise BackendUnavailable(
                f"cannot start a tool worker for {account.name}: {exc.strerror}"
            ) from None
        w = Worker(account, proc)
        try:
            who = await w.request(
                "worker.whoami", {}, min(START_TIMEOUT, max(0.5, deadline - time.monotonic()))
            )
        except WorkerFailed as exc:
            raise BackendUnavailable(
                f"cannot start a tool worker for {account.name}: {exc}"
            ) from None
        me = who.get("result") or {}
        if me.get("uid") != account.uid or me.get("euid") != account.uid:
            w.kill()
            raise BackendUnavailable(
                f"a tool worker for {account.name} runs as uid {me.get('uid')}: killed"
            )
        log.info("tool worker %d started for %s (uid %d)", w.pid, account.name, account.uid)
        return w

    # --- idle workers ---------------------------------------------------------------------------

    def _arm_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Stop workers idle for longer than worker_idle_timeout, until none is left."""
        while self._by_uid and not self.closed:
            idle_for = self._cfg().worker_idle_timeout
            now = time.monotonic()
            stale = [
                w
                for ws in self._by_uid.values()
                for w in ws
                if not w.busy and now - w.idle_since >= idle_for
            ]
            for w in stale:
                self._forget(w)
                await w.close()
            soonest = min(
                (w.idle_since + idle_for for ws in self._by_uid.values() for w in ws if not w.busy),
                default=now + idle_for,
            )
            await asyncio.sleep(max(0.05, soonest - time.monotonic()))

    async def close(self) -> None:
        """Stop every worker (the daemon stops)."""
        self.closed = True
        if self._reaper is not None:
            self._reaper.cancel()
        workers = [w for ws in self._by_uid.values() for w in ws]
        self._by_uid.clear()
        for w in workers:
            if w.busy:
                w.kill()
        await asyncio.gather(*(w.close() for w in workers), return_exceptions=True)

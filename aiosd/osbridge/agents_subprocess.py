"""The subprocess backend: agents as children of the daemon (no systemd as PID 1 needed).

Each agent is started through :func:`aiosd.osbridge.executor.confined_argv` (setpriv, env,
prlimit, nice: the program runs as its owner, with no new privileges, SIGKILL if the daemon
dies) in a session and process group of its own, from the event loop's thread (the
parent-death signal follows the thread that forked).  The daemon keeps a pidfd of the
agent's main process and does not reap it until the agent is over: while it is unreaped,
its pid, and so the agent's process group and session ids, cannot be given to any other
process, so signalling the group never reaches a stranger.

What the kernel cannot bound per agent without cgroups is watched: every
``agents.watch_interval`` seconds the processes of each agent's session are summed (resident
memory, tasks, CPU), and an agent over its ``memory_max`` or ``tasks_max`` is killed, with
the reason recorded.  RLIMIT_NPROC backs ``tasks_max`` up against a fork bomb faster than
the watch.  A process that leaves the agent's session (``setsid``) leaves the agent: use the
systemd backend where that matters (its cgroup cannot be left).

stdout and stderr go through pipes into the daemon, which keeps the last
``agents.log_max_bytes`` of them per agent as JSON lines (two files, each half of that).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from aiosd.config import AgentsConfig
from aiosd.errors import NotSupported
from aiosd.kernel.agents import (
    Agent,
    Backend,
    Follower,
    Launch,
    LogLine,
    Usage,
    exit_reason,
    no_lines,
)
from aiosd.osbridge import proc
from aiosd.osbridge.executor import WRAPPER_FAILED, ProcessLimits, confined_argv

log = logging.getLogger(__name__)

#: How long output may still arrive after an agent's main process has ended.
DRAIN_TIMEOUT = 1.0
#: A line longer than this is cut into pieces of this many bytes.
MAX_LINE = 8192
#: The wrappers, as they name themselves on stderr when they cannot go on ("env: …" or
#: "/usr/bin/env: …").
_WRAPPERS = frozenset({"setpriv", "env", "prlimit", "nice"})


def _from_wrapper(line: str) -> bool:
    """Whether a line of stderr is a wrapper's own complaint."""
    head, colon, _ = line.partition(":")
    return bool(colon) and head.rsplit("/", 1)[-1] in _WRAPPERS


def nice_for(weight: int) -> int:
    """The nice value whose CPU share against nice 0 is ``weight``/100 (each nice step is
    a factor of 1.25 in Linux's scheduler); a user cannot raise a priority, so at least 0."""
    if weight >= 100:
        return 0
    return min(19, round(math.log(100 / weight, 1.25)))


class _Log:
    """An agent's output: the last log_max_bytes of it on disk, and its followers."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.old = path.with_suffix(".log.1")
        self.part = max(2048, max_bytes // 2)
        self.followers: set[Follower] = set()
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 (closed by close())
        os.fchmod(self._file.fileno(), 0o600)
        self._size = self._file.tell()
        self.tail: collections.deque[str] = collections.deque(maxlen=4)  # stderr, for reasons

    def write(self, line: LogLine) -> None:
        data = json.dumps(line.public(), ensure_ascii=False).encode() + b"\n"
        if self._size + len(data) > self.part and self._size:
            self._file.close()
            os.replace(self.path, self.old)
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115
            os.fchmod(self._file.fileno(), 0o600)
            self._size = 0
        self._file.write(data)
        self._size += len(data)
        if line.stream == "stderr":
            self.tail.append(line.text)
        for f in self.followers:
            f.put(line)

    def close(self) -> None:
        self._file.close()
        for f in self.followers:
            f.end()


def read_log(path: Path, tail: int) -> list[LogLine]:
    """The last ``tail`` lines kept at ``path`` (and its older part)."""
    lines: list[bytes] = []
    for part in (path, path.with_suffix(".log.1")):
        try:
            lines = part.read_bytes().splitlines() + lines
        except FileNotFoundError:
            continue
        if len(lines) >= tail:
            break
    out = []
    for raw in lines[len(lines) - tail :] if tail else []:
        try:
            d = json.loads(raw)
            out.append(LogLine(d["time"], d["stream"], d["text"]))
        except (ValueError, KeyError):
            continue  # a line cut short when the daemon died
    return out


class _Output(asyncio.Protocol):
    """One of an agent's pipes, read into its log line by line."""

    def __init__(self, log_: _Log, stream: Literal["stdout", "stderr"], done: asyncio.Future[None]):
        self.log = log_
        self.stream: Literal["stdout", "stderr"] = stream
        self.done = done
        self.buf = bytearray()
        self.transport: asyncio.ReadTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\n")
            if end < 0:
                if len(self.buf) >= MAX_LINE:
                    end = MAX_LINE
                else:
                    return
                piece, rest = self.buf[:end], self.buf[end:]
            else:
                piece, rest = self.buf[:end], self.buf[end + 1 :]
            self.buf = bytearray(rest)
            self._line(bytes(piece))

    def _line(self, raw: bytes) -> None:
        for i in range(0, max(len(raw), 1), MAX_LINE):
            text = raw[i : i + MAX_LINE].decode(errors="replace")
            self.log.write(LogLine(time.time(), self.stream, text))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.buf:
            self._line(bytes(self.buf))
            self.buf.clear()
        if not self.done.done():
            self.done.set_result(None)


class _Proc:
    """A running agent's main process, its pidfd, its output and what it uses."""

    def __init__(self, aid: str, popen: subprocess.Popen[bytes], log_: _Log, spec: Launch):
        self.aid = aid
        self.popen = popen
        self.pid = popen.pid
        self.pidfd = os.pidfd_open(popen.pid)
        st = proc.stat(popen.pid)
        self.start = st.start if st is not None else 0
        self.log = log_
        self.spec = spec
        self.outputs: list[asyncio.Future[None]] = []
        self.transports: list[asyncio.BaseTransport] = []
        self.usage = Usage()
        self.reaped = False
        self.reason = ""  # why the daemon killed it, if it did


class SubprocessBackend(Backend):
    """Agents as the daemon's children; see the module's docstring."""

    name = "subprocess"

    def __init__(self, cfg: AgentsConfig, log_dir: Path) -> None:
        self.cfg = cfg
        self.log_dir = log_dir
        self._procs: dict[str, _Proc] = {}
        self._by_leader: dict[int, _Proc] = {}
        self._watch: asyncio.Task[None] | None = None
        self._endings: set[asyncio.Task[None]] = set()

    async def open(self, known: list[Agent]) -> set[str]:
        self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.log_dir, 0o700)
        return set()  # they had the daemon's death signal: none of them runs any more

    # --- starting -----------------------------------------------------------------------------

    async def launch(self, spec: Launch) -> int:
        lim = spec.limits
        nproc = None
        if lim.tasks_max:
            # RLIMIT_NPROC counts every task of the user: what they run now, plus the agent's.
            nproc = await asyncio.to_thread(_tasks_of, spec.account.uid) + lim.tasks_max
        argv = confined_argv(
            spec.account,
            spec.cwd,
            ProcessLimits(processes=nproc, core=0, nice=nice_for(lim.cpu_weight)),
            spec.argv,
        )
        log_ = _Log(self.log_dir / f"{spec.aid}.log", self.cfg.log_max_bytes)
        loop = asyncio.get_running_loop()
        try:
            # On the loop's thread: the parent-death signal is tied to the forking thread.
            popen = subprocess.Popen(
                argv,
                env=spec.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd="/",
                start_new_session=True,
                close_fds=True,
                umask=0o077,
            )
        except OSError as exc:
            log_.close()
            raise NotSupported(f"cannot start {argv[0]}: {exc.strerror}") from None
        p = _Proc(spec.aid, popen, log_, spec)
        assert popen.stdout is not None and popen.stderr is not None
        for pipe, stream in ((popen.stdout, "stdout"), (popen.stderr, "stderr")):
            done: asyncio.Future[None] = loop.create_future()
            transport, _ = await loop.connect_read_pipe(
                lambda pipe_done=done, s=stream: _Output(log_, s, pipe_done),  # type: ignore[misc]
                pipe,
            )
            p.outputs.append(done)
            p.transports.append(transport)
        self._procs[spec.aid] = p
        self._by_leader[p.pid] = p
        loop.add_reader(p.pidfd, self._main_ended, p)
        if self._watch is None or self._watch.done():  # only while agents run: no idle wake-ups
            self._watch = loop.create_task(self._watching())
        await _past_setpriv(p.pid, argv[0])
        return p.pid

    # --- ending -------------------------------------------------------------------------------

    def _main_ended(self, p: _Proc) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(p.pidfd)
        task = loop.create_task(self._end(p))
        self._endings.add(task)
        task.add_done_callback(self._endings.discard)

    async def _end(self, p: _Proc) -> None:
        """The main process has exited: end the rest of the agent, reap, tell the manager."""
        info = os.waitid(os.P_PIDFD, p.pidfd, os.WEXITED | os.WNOWAIT)
        # The main process is a zombie now: its group id is still ours to signal.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        os.waitid(os.P_PIDFD, p.pidfd, os.WEXITED)
        p.reaped = True
        os.close(p.pidfd)
        if info is None:  # pragma: no cover - WNOWAIT after readiness always has one
            code, sig = None, None
        elif info.si_code == os.CLD_EXITED:
            code, sig = info.si_status, None
        else:
            code, sig = None, info.si_status
        p.popen.returncode = code if sig is None else -(sig or 0)
        # Output written just before the end still arrives; a process that left the agent's
        # session and holds the pipes does not keep the agent from ending.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*p.outputs), DRAIN_TIMEOUT)
        for t in p.transports:
            t.close()
        p.log.close()
        reason = p.reason
        if reason:
            reason = f"{reason}; {exit_reason(code, sig)}"
        elif code in WRAPPER_FAILED:
            said = next((t for t in reversed(p.log.tail) if _from_wrapper(t)), None)
            if said is not None:
                reason = f"could not start: {said}"
        try:
            self.on_exit(p.aid, code, sig, reason)  # it reads the last usage(): still here
        finally:
            self._procs.pop(p.aid, None)
            self._by_leader.pop(p.pid, None)

    # --- acting -------------------------------------------------------------------------------

    def signal(self, agent: Agent, sig: int) -> None:
        p = self._procs.get(agent.aid)
        if p is None or p.reaped:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)

    async def suspend(self, agent: Agent) -> None:
        self.signal(agent, signal.SIGSTOP)

    async def resume(self, agent: Agent) -> None:
        self.signal(agent, signal.SIGCONT)

    # --- who is who ---------------------------------------------------------------------------

    def identify(self, pid: int, uid: int) -> str | None:
        s = proc.stat(pid)
        hops = 0
        while s is not None and hops < 64:
            # The agent's session (or process group, where a process left the session but
            # not the group): the ids stay the main process's while the agent lives.
            for leader in (s.session, s.pgrp):
                p = self._by_leader.get(leader)
                if p is not None and p.spec.account.uid == uid and s.start >= p.start:
                    return p.aid
            # Or a descendant of the main process that made a session of its own.
            p = self._by_leader.get(s.ppid)
            if p is not None:
                parent = proc.stat(s.ppid)
                if parent is not None and parent.start == p.start and p.spec.account.uid == uid:
                    return p.aid
            if s.ppid <= 1:
                return None
            s = proc.stat(s.ppid)
            hops += 1
        return None

    def usage(self, agent: Agent) -> Usage:
        p = self._procs.get(agent.aid)
        return p.usage if p is not None else Usage()

    # --- watching -----------------------------------------------------------------------------

    async def _watching(self) -> None:
        while self._procs:
            await asyncio.sleep(self.cfg.watch_interval)
            if not self._procs:
                return
            try:
                stats = await asyncio.to_thread(proc.all_stats)
            except OSError as exc:  # pragma: no cover - /proc is always there
                log.warning("agents: reading /proc failed: %s", exc)
                continue
            self._account(stats)

    def _account(self, stats: list[proc.Stat]) -> None:
        sums: dict[str, Usage] = {}
        for s in stats:
            p = self._by_leader.get(s.session) or self._by_leader.get(s.pgrp)
            if p is None or s.start < p.start:
                continue
            u = sums.setdefault(p.aid, Usage())
            u.cpu_s += s.cpu
            u.rss += s.rss
            u.tasks += s.threads
        for aid, u in sums.items():
            p = self._procs.get(aid)
            if p is None or p.reaped:
                continue
            u.max_rss = max(p.usage.max_rss, u.rss)
            u.cpu_s = max(u.cpu_s, p.usage.cpu_s)
            p.usage = u
            lim = p.spec.limits
            if p.reason:
                continue
            if lim.memory_max and u.rss > lim.memory_max:
                p.reason = (
                    f"memory limit: {u.rss // 1024} KiB resident, more than memory_max "
                    f"{lim.memory_max // 1024} KiB"
                )
            elif lim.tasks_max and u.tasks > lim.tasks_max:
                p.reason = f"tasks limit: {u.tasks} tasks, more than tasks_max {lim.tasks_max}"
            else:
                continue
            log.warning("agent %s: %s: killing it", aid, p.reason)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)

    # --- logs ---------------------------------------------------------------------------------

    async def logs(self, agent: Agent, tail: int) -> list[LogLine]:
        return await asyncio.to_thread(read_log, self.log_dir / f"{agent.aid}.log", tail)

    def follow(self, agent: Agent) -> AsyncIterator[LogLine | int]:
        p = self._procs.get(agent.aid)
        if p is None:
            return no_lines()
        f = Follower()
        p.log.followers.add(f)  # now: the lines written from here on are this follower's
        return self._following(p, f)

    async def _following(self, p: _Proc, f: Follower) -> AsyncIterator[LogLine | int]:
        try:
            async for item in f.drain():
                yield item
        finally:
            p.log.followers.discard(f)

    async def forget(self, agent: Agent) -> None:
        for suffix in (".log", ".log.1"):
            with contextlib.suppress(FileNotFoundError):
                (self.log_dir / f"{agent.aid}{suffix}").unlink()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._endings:
            await asyncio.gather(*self._endings, return_exceptions=True)


#: How long launch waits for the agent to have left setpriv (it does in about a millisecond).
SETPRIV_WAIT = 5.0


async def _past_setpriv(pid: int, wrapper: str) -> None:
    """Wait until ``pid`` no longer runs ``wrapper`` (setpriv), or has ended.

    setpriv sets the parent-death signal before it executes the next program; until then a
    daemon that dies leaves the agent running with no one to end it.  So an agent counts as
    started, and agent.spawn answers, only once setpriv is behind it.
    """
    want = wrapper.encode()
    deadline = time.monotonic() + SETPRIV_WAIT
    delay = 0.0005
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                first = f.read().split(b"\0", 1)[0]
            st = proc.stat(pid)
        except OSError:
            return
        if first != want or st is None or st.state in ("Z", "X"):
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)
    log.warning("agent process %d still runs %s after %.0f s", pid, wrapper, SETPRIV_WAIT)


def _tasks_of(uid: int) -> int:
    """How many tasks (threads) the user ``uid`` has now."""
    n = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
        except FileNotFoundError:
            continue
        s = proc.stat(int(name))
        if s is not None:
            n += s.threads
    return n

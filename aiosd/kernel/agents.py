"""Agents: ordinary processes of their owners, started, watched, limited and ended by the daemon.

An agent is a process tree running as its owner's Unix user (never as root), started by the
daemon on the owner's request and known by an agent id (AID): random, so that the ids a user
sees say nothing of how many agents others run, and never reused (every AID is kept in the
daemon's ``agents.sqlite``).  The manager keeps the table of agents and their records; a
*backend* runs the processes:

* :mod:`aiosd.osbridge.agents_subprocess`: the agent's processes are children of the daemon,
  in a session and process group of their own (machines without systemd as PID 1);
* :mod:`aiosd.osbridge.agents_systemd`: one transient unit per agent, in ``aiosd-agents.slice``.

Whichever backend runs it, an agent is recognised by the daemon on every connection it opens,
from what the kernel says of the connecting process (its cgroup, or its session, process
group and ancestry), never from anything the process sends: see :meth:`AgentManager.identify`.
Only the owner and administrators see or touch an agent; to everyone else an agent does not
exist (the same NotFound as for an AID nobody has).
"""

from __future__ import annotations

import abc
import asyncio
import collections
import dataclasses
import json
import logging
import os
import secrets
import signal
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from aiosd.config import AgentsConfig
from aiosd.errors import InvalidParams, NotFound, NotSupported, QuotaExceeded
from aiosd.osbridge.executor import UnixAccount, user_environment

log = logging.getLogger(__name__)

State = Literal["running", "suspended", "stopping", "exited", "killed", "failed", "lost"]
#: States of an agent whose processes may still run.
LIVE: frozenset[str] = frozenset({"running", "suspended", "stopping"})

#: Lines a follower of an agent's logs may fall behind before lines are dropped for it.
FOLLOW_BUFFER = 1024


def agent_space(aid: str) -> str:
    """The short-term memory space of agent ``aid``: the default space of its syscalls."""
    return f"agent-{aid}"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What an agent may use; 0 means no limit."""

    memory_max: int = 0  # bytes of resident memory, the whole agent
    tasks_max: int = 0  # processes and threads, the whole agent
    runtime_max: float = 0.0  # seconds of wall-clock time
    cpu_weight: int = 100  # share of CPU against others, 1 to 10000 (100: as everyone)


@dataclasses.dataclass(frozen=True)
class Launch:
    """What a backend needs to start an agent's processes."""

    aid: str
    account: UnixAccount
    argv: list[str]
    cwd: str
    env: dict[str, str]
    limits: Limits


@dataclasses.dataclass
class Usage:
    """What an agent's processes use now (and the most resident memory seen)."""

    cpu_s: float = 0.0
    rss: int = 0
    tasks: int = 0
    max_rss: int = 0


@dataclasses.dataclass
class LogLine:
    """One line an agent wrote."""

    time: float
    stream: Literal["stdout", "stderr"]
    text: str

    def public(self) -> dict[str, Any]:
        return {"time": round(self.time, 6), "stream": self.stream, "text": self.text}


class Follower:
    """One reader of an agent's lines as they come: it may fall FOLLOW_BUFFER lines behind,
    beyond which lines are dropped and counted, never blocking the agent or the daemon."""

    def __init__(self) -> None:
        self.lines: collections.deque[LogLine] = collections.deque()
        self.dropped = 0
        self.over = False
        self.more = asyncio.Event()

    def put(self, line: LogLine) -> None:
        if len(self.lines) >= FOLLOW_BUFFER:
            self.dropped += 1
        else:
            self.lines.append(line)
        self.more.set()

    def end(self) -> None:
        """No more lines will come (the agent's output is closed)."""
        self.over = True
        self.more.set()

    async def drain(self) -> AsyncIterator[LogLine | int]:
        """The lines as they come, until the end; an ``int`` counts lines dropped."""
        while True:
            await self.more.wait()
            self.more.clear()
            if self.dropped:
                n, self.dropped = self.dropped, 0
                yield n
            while self.lines:
                yield self.lines.popleft()
            if self.over and not self.lines:
                return


async def no_lines() -> AsyncIterator[LogLine | int]:
    """What following an agent that has ended gives: nothing."""
    return
    yield  # an async generator


def signal_name(sig: int) -> str:
    """``SIGTERM`` for 15; the number, as text, for a signal Python has no name for."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


@dataclasses.dataclass
class Agent:
    """One agent, running or ended: the record the syscalls show."""

    aid: str
    uid: int
    user: str
    argv: list[str]
    cwd: str
    label: str
    name: str | None  # the installed agent it was started from
    priority: str
    memory_budget: int
    tools: list[str] | None
    limits: Limits
    backend: str
    state: State = "running"
    pid: int | None = None
    started: float = 0.0  # Unix time
    ended: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    syscalls: int = 0
    usage: Usage = dataclasses.field(default_factory=Usage)
    #: Set when the agent ends (then its processes are gone).
    ended_event: asyncio.Event = dataclasses.field(default_factory=asyncio.Event, repr=False)
    #: Set by the manager while a stop is under way: the reason it ends with.
    stop_reason: str | None = dataclasses.field(default=None, repr=False)

    @property
    def live(self) -> bool:
        return self.state in LIVE

    def space(self) -> str:
        """The agent's own short-term memory space (its default one)."""
        return agent_space(self.aid)


class Backend(abc.ABC):
    """Runs agents' processes.  Every method is called on the event loop."""

    #: "subprocess" or "systemd", as ``system.status`` shows it.
    name: str

    #: Told when an agent's processes have ended: (aid, exit code, signal, reason).
    on_exit: Callable[[str, int | None, int | None, str], None]

    def configure(self, cfg: AgentsConfig) -> None:
        """A reload's new ``[agents]`` (the backend itself is never changed by one)."""
        self.cfg = cfg

    cfg: AgentsConfig

    @abc.abstractmethod
    async def open(self, known: list[Agent]) -> set[str]:
        """Get ready; of the agents ``known`` to be live when the daemon last ran, the AIDs
        whose processes still run and are taken over again (the others are lost)."""

    @abc.abstractmethod
    async def launch(self, spec: Launch) -> int:
        """Start an agent's processes; the pid of its main process."""

    @abc.abstractmethod
    def signal(self, agent: Agent, sig: int) -> None:
        """Send ``sig`` to every process of the agent."""

    @abc.abstractmethod
    async def suspend(self, agent: Agent) -> None:
        """Freeze every process of the agent."""

    @abc.abstractmethod
    async def resume(self, agent: Agent) -> None:
        """Thaw every process of the agent."""

    @abc.abstractmethod
    def identify(self, pid: int, uid: int) -> str | None:
        """The AID of the live agent process ``pid`` of ``uid`` belongs to, if any."""

    @abc.abstractmethod
    def usage(self, agent: Agent) -> Usage:
        """What the agent's processes use now."""

    @abc.abstractmethod
    async def logs(self, agent: Agent, tail: int) -> list[LogLine]:
        """The agent's last ``tail`` lines of output, oldest first."""

    @abc.abstractmethod
    def follow(self, agent: Agent) -> AsyncIterator[LogLine | int]:
        """The agent's lines from now on, until it has ended and its output is closed; an
        ``int`` is a count of lines dropped because the follower fell behind.  The follower
        is in place when this returns (not when the iterator first runs), so that a caller
        reading the kept lines afterwards misses none in between."""

    @abc.abstractmethod
    async def forget(self, agent: Agent) -> None:
        """Remove what is kept of an ended agent (its logs)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the backend (the agents have been stopped)."""


# --- the daemon's record of agents --------------------------------------------------------------


_SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    aid TEXT PRIMARY KEY,
    uid INTEGER NOT NULL,
    record TEXT NOT NULL,
    live INTEGER NOT NULL,
    started REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS agents_by_uid ON agents (uid, live, started);
"""


class Records:
    """``agents.sqlite``: every AID ever given, and the records of the agents kept.

    Written off the event loop, one statement at a time under a lock.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        os.close(fd)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def load(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute("SELECT record FROM agents ORDER BY started").fetchall()
        return [json.loads(r[0]) for r in rows]

    def new_aid(self, uid: int, record: dict[str, Any]) -> str:
        """A fresh AID, never given before, with its first record."""
        with self._lock:
            while True:
                aid = secrets.token_hex(6)
                record["aid"] = aid
                try:
                    self._db.execute(
                        "INSERT INTO agents (aid, uid, record, live, started) VALUES (?,?,?,1,?)",
                        (aid, uid, json.dumps(record), record["started"]),
                    )
                except sqlite3.IntegrityError:
                    continue  # 1 in 2^48 per agent held: draw again
                return aid

    def save(self, aid: str, record: dict[str, Any], live: bool) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE agents SET record = ?, live = ? WHERE aid = ?",
                (json.dumps(record), int(live), aid),
            )

    def forget(self, aids: list[str]) -> None:
        """Drop the records (the AIDs stay given: their rows keep only the id)."""
        with self._lock:
            self._db.executemany(
                "UPDATE agents SET record = '{}', live = 0, uid = -1 WHERE aid = ?",
                [(a,) for a in aids],
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(a: Agent) -> dict[str, Any]:
    return {
        "aid": a.aid,
        "uid": a.uid,
        "user": a.user,
        "argv": a.argv,
        "cwd": a.cwd,
        "label": a.label,
        "name": a.name,
        "priority": a.priority,
        "memory_budget": a.memory_budget,
        "tools": a.tools,
        "limits": dataclasses.asdict(a.limits),
        "backend": a.backend,
        "state": a.state,
        "pid": a.pid,
        "started": a.started,
        "ended": a.ended,
        "exit_code": a.exit_code,
        "signal": a.signal,
        "reason": a.reason,
        "tokens_in": a.tokens_in,
        "tokens_out": a.tokens_out,
        "syscalls": a.syscalls,
        "cpu_s": a.usage.cpu_s,
        "max_rss": a.usage.max_rss,
    }


def _agent(r: dict[str, Any]) -> Agent:
    a = Agent(
        aid=r["aid"],
        uid=r["uid"],
        user=r["user"],
        argv=r["argv"],
        cwd=r["cwd"],
        label=r["label"],
        name=r["name"],
        priority=r["priority"],
        memory_budget=r["memory_budget"],
        tools=r["tools"],
        limits=Limits(**r["limits"]),
        backend=r["backend"],
        state=r["state"],
        pid=r["pid"],
        started=r["started"],
        ended=r["ended"],
        exit_code=r["exit_code"],
        signal=r["signal"],
        reason=r["reason"],
        tokens_in=r["tokens_in"],
        tokens_out=r["tokens_out"],
        syscalls=r["syscalls"],
        usage=Usage(cpu_s=r["cpu_s"], max_rss=r["max_rss"]),
    )
    if not a.live:
        a.ended_event.set()
    return a


# --- the manager ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpawnSpec:
    """An agent to start for ``account``, checked by the syscall layer."""

    account: UnixAccount
    argv: list[str]
    cwd: str | None
    env: dict[str, str]
    limits: Limits
    label: str
    name: str | None
    priority: str
    memory_budget: int
    tools: list[str] | None


def exit_reason(code: int | None, sig: int | None) -> str:
    """How a process ended, in words."""
    if sig is not None:
        name = signal_name(sig)
        return f"killed by {name if not name.isdigit() else f'signal {name}'}"
    return f"exited with status {code}"


class AgentManager:
    """The table of agents: spawn, watch, signal, end; who an agent's connections are."""

    def __init__(
        self,
        cfg: AgentsConfig,
        state_dir: Path,
        backend: Backend,
        socket_path: Callable[[], str],
    ) -> None:
        self.cfg = cfg
        self.backend = backend
        backend.on_exit = self._exited
        self._socket_path = socket_path
        self._records = Records(state_dir / "agents.sqlite")
        self._agents: dict[str, Agent] = {}
        #: AIDs of the live agents.
        self._live: set[str] = set()
        #: Spawns under way (not yet in the table), by owner uid: they count against limits.
        self._starting: collections.Counter[int] = collections.Counter()
        self._stops: set[asyncio.Task[None]] = set()
        self._runtime: dict[str, asyncio.TimerHandle] = {}
        self._saving: set[asyncio.Future[None]] = set()
        #: Called with the agent whenever an agent's state changes (front-ends signal it).
        self.listeners: list[Callable[[Agent], None]] = []
        self.closed = False

    # --- life of the manager ------------------------------------------------------------------

    async def open(self) -> None:
        """Load the records; agents that were live when the daemon last stopped are taken
        over again where the backend can, and reported lost where it cannot."""
        rows = await asyncio.to_thread(self._records.load)
        agents = [_agent(r) for r in rows if r]
        known = [a for a in agents if a.live]
        kept = await self.backend.open(known)
        now = time.time()
        for a in agents:
            self._agents[a.aid] = a
            if a.live and a.aid in kept:
                self._live.add(a.aid)
            if a.live and a.aid not in kept:
                a.state = "lost"
                a.ended = now
                a.reason = "the daemon stopped while it ran, and its processes are gone"
                a.ended_event.set()
                self._save(a)
        log.info(
            "agents: backend %s; %d taken over, %d lost, %d ended kept",
            self.backend.name,
            len(kept),
            len(known) - len(kept),
            sum(1 for a in agents if not a.live) - (len(known) - len(kept)),
        )

    async def close(self, timeout: float) -> None:
        """Stop every live agent (SIGTERM, then SIGKILL after ``timeout``), then the backend."""
        self.closed = True
        live = [a for a in self._agents.values() if a.live]
        if live:
            log.info("stopping %d agent(s)", len(live))
            await asyncio.gather(
                *(self._stop(a, timeout, "the daemon stopped") for a in live),
                return_exceptions=True,
            )
        for t in self._runtime.values():
            t.cancel()
        if self._saving:
            await asyncio.gather(*self._saving, return_exceptions=True)
        await self.backend.close()
        await asyncio.to_thread(self._records.close)

    def configure(self, cfg: AgentsConfig) -> None:
        """A reload: new bounds at once; new limits for agents started from now on."""
        self.cfg = cfg
        self.backend.configure(cfg)

    # --- what callers see -----------------------------------------------------------------------

    def visible(self, uid: int, admin: bool) -> list[Agent]:
        """The agents ``uid`` may see, oldest first."""
        return [a for a in self._agents.values() if admin or a.uid == uid]

    def get(self, aid: str, uid: int, admin: bool) -> Agent:
        """The agent ``aid``, if ``uid`` may see it; NotFound otherwise, exactly as for an AID
        that nobody has (another user's agent does not exist for a user)."""
        a = self._agents.get(aid)
        if a is None or not (admin or a.uid == uid):
            raise NotFound(f"no agent {aid!r}")
        if a.live:
            u = self.backend.usage(a)
            a.usage.cpu_s, a.usage.rss, a.usage.tasks = u.cpu_s, u.rss, u.tasks
            a.usage.max_rss = max(a.usage.max_rss, u.max_rss, u.rss)
        return a

    def tools_of(self, aid: str) -> list[str]:
        """The tools agent ``aid`` may use: its allowed-tools list (no list: any tool).  An
        AID the manager does not know gets none."""
        a = self._agents.get(aid)
        if a is None:
            return []
        return ["*"] if a.tools is None else list(a.tools)

    def identify(self, pid: int, uid: int) -> str | None:
        """The AID of the live agent the process ``pid`` (of ``uid``, from the kernel) is part
        of, or None.  Nothing the process says counts: only its cgroup or its ancestry."""
        if not self._live:  # read from the bus's thread too: a set's len() is atomic
            return None
        return self.backend.identify(pid, uid)

    def agent_of(self, aid: str | None) -> Agent | None:
        """The live agent ``aid`` (from :meth:`identify`), if it is still live."""
        if aid is None:
            return None
        a = self._agents.get(aid)
        return a if a is not None and a.live else None

    # --- accounting -----------------------------------------------------------------------------

    def count_syscall(self, aid: str) -> None:
        a = self._agents.get(aid)
        if a is not None:
            a.syscalls += 1

    def count_tokens(self, aid: str, prompt: int, completion: int) -> None:
        a = self._agents.get(aid)
        if a is not None:
            a.tokens_in += prompt
            a.tokens_out += completion

    # --- spawning -------------------------------------------------------------------------------

    def _room_for(self, uid: int, admin: bool) -> None:
        cfg = self.cfg
        total = len(self._live) + sum(self._starting.values())
        mine = self._starting[uid] + sum(1 for aid in self._live if self._agents[aid].uid == uid)
        if mine >= cfg.max_agents_per_user:
            raise QuotaExceeded(
                f"uid {uid} already runs {mine} agents (agents.max_agents_per_user "
                f"{cfg.max_agents_per_user}); stop one first",
                data={"limit": "agents.max_agents_per_user", "value": cfg.max_agents_per_user},
            )
        shared = cfg.max_agents - (0 if admin else cfg.admin_reserved_agents)
        if total >= shared:
            raise QuotaExceeded(
                f"the daemon already runs {total} agents (agents.max_agents "
                f"{cfg.max_agents}, of which the last {cfg.admin_reserved_agents} are kept for "
                "administrators)",
                data={"limit": "agents.max_agents", "value": cfg.max_agents},
            )

    async def spawn(self, spec: SpawnSpec, admin: bool) -> Agent:
        """Start an agent for ``spec.account``; its record once its processes run."""
        if self.closed:
            raise NotSupported("the daemon is stopping and starts no agents")
        acct = spec.account
        self._room_for(acct.uid, admin)
        self._starting[acct.uid] += 1
        try:
            return await self._spawn(spec)
        finally:
            self._starting[acct.uid] -= 1
            if not self._starting[acct.uid]:
                del self._starting[acct.uid]

    async def _spawn(self, spec: SpawnSpec) -> Agent:
        acct = spec.account
        cwd = spec.cwd or acct.home
        if not cwd or not os.path.isabs(cwd):
            raise InvalidParams(f"invalid params: cwd: {cwd!r} is not an absolute path")
        a = Agent(
            aid="",
            uid=acct.uid,
            user=acct.name,
            argv=spec.argv,
            cwd=cwd,
            label=spec.label,
            name=spec.name,
            priority=spec.priority,
            memory_budget=spec.memory_budget,
            tools=spec.tools,
            limits=spec.limits,
            backend=self.backend.name,
            started=time.time(),
        )
        a.aid = await asyncio.to_thread(self._records.new_aid, acct.uid, _record(a))
        self._agents[a.aid] = a
        self._live.add(a.aid)
        env = dict(spec.env)
        fixed = {"AIOSD_SOCKET": self._socket_path(), "AIOSD_AGENT_ID": a.aid}
        try:
            a.pid = await self.backend.launch(
                Launch(a.aid, acct, spec.argv, cwd, user_environment(acct, env, fixed), a.limits)
            )
        except Exception as exc:
            self._live.discard(a.aid)
            a.state = "failed"
            a.ended = time.time()
            a.reason = f"could not start: {getattr(exc, 'message', None) or exc}"
            a.ended_event.set()
            self._save(a)
            self._prune(a.uid)
            raise
        if a.limits.runtime_max:
            self._runtime[a.aid] = asyncio.get_running_loop().call_later(
                a.limits.runtime_max, self._out_of_time, a
            )
        log.info("agent %s of %s (uid %d) started: pid %s, %s", a.aid, a.user, a.uid, a.pid, a.argv)
        self._save(a)
        self._changed(a)
        return a

    def _out_of_time(self, a: Agent) -> None:
        self._runtime.pop(a.aid, None)
        if a.live and a.stop_reason is None:
            self._start_stop(a, f"runtime limit: ran for {a.limits.runtime_max:g} s (runtime_max)")

    # --- acting on agents -----------------------------------------------------------------------

    async def stop(self, a: Agent, timeout: float | None, reason: str) -> Agent:
        """SIGTERM, then SIGKILL after ``timeout`` (agents.stop_timeout); until it has ended."""
        if a.live:
            await self._stop(a, self.cfg.stop_timeout if timeout is None else timeout, reason)
        return a

    def _start_stop(self, a: Agent, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self._stop(a, self.cfg.stop_timeout, reason))
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)

    async def _stop(self, a: Agent, timeout: float, reason: str) -> None:
        if a.stop_reason is None:
            a.stop_reason = reason
        if a.state == "suspended":
            self.backend.signal(a, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        if a.state != "stopping":
            a.state = "stopping"
            self._changed(a)
        self.backend.signal(a, signal.SIGTERM)
        try:
            await asyncio.wait_for(a.ended_event.wait(), timeout)
        except TimeoutError:
            log.info("agent %s did not end %.1f s after SIGTERM: SIGKILL", a.aid, timeout)
            self.backend.signal(a, signal.SIGKILL)
            await a.ended_event.wait()

    def kill(self, a: Agent, sig: int, reason: str) -> None:
        """Send ``sig`` to every process of the agent."""
        if not a.live:
            return
        if sig in (signal.SIGKILL, signal.SIGTERM) and a.stop_reason is None:
            a.stop_reason = reason
        self.backend.signal(a, sig)

    async def suspend(self, a: Agent) -> Agent:
        if a.state == "running":
            await self.backend.suspend(a)
            a.state = "suspended"
            self._changed(a)
        return a

    async def resume(self, a: Agent) -> Agent:
        if a.state == "suspended":
            await self.backend.resume(a)
            a.state = "running"
            self._changed(a)
        return a

    async def wait(self, a: Agent, timeout: float | None) -> bool:
        """Whether the agent has ended within ``timeout`` seconds (None: however long)."""
        try:
            await asyncio.wait_for(a.ended_event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # --- the backend tells ----------------------------------------------------------------------

    def _exited(self, aid: str, code: int | None, sig: int | None, reason: str) -> None:
        a = self._agents.get(aid)
        if a is None or not a.live:
            return
        u = self.backend.usage(a)
        a.usage.cpu_s = max(a.usage.cpu_s, u.cpu_s)
        a.usage.max_rss = max(a.usage.max_rss, u.max_rss, u.rss)
        a.usage.rss, a.usage.tasks = 0, 0
        a.exit_code, a.signal = code, sig
        a.ended = time.time()
        if reason:
            a.reason = reason
        elif a.stop_reason is not None:
            a.reason = f"{a.stop_reason}; {exit_reason(code, sig)}"
        else:
            a.reason = exit_reason(code, sig)
        a.state = "killed" if sig is not None else ("failed" if reason else "exited")
        self._live.discard(aid)
        timer = self._runtime.pop(aid, None)
        if timer is not None:
            timer.cancel()
        a.ended_event.set()
        log.info("agent %s of %s ended: %s", aid, a.user, a.reason)
        self._save(a)
        self._changed(a)
        self._prune(a.uid)

    # --- housekeeping ---------------------------------------------------------------------------

    def _changed(self, a: Agent) -> None:
        for listener in list(self.listeners):
            try:
                listener(a)
            except Exception:
                log.exception("an agent listener failed")

    def _save(self, a: Agent) -> None:
        fut = asyncio.ensure_future(
            asyncio.to_thread(self._records.save, a.aid, _record(a), a.live)
        )
        self._saving.add(fut)
        fut.add_done_callback(self._saved)

    def _saved(self, fut: asyncio.Future[None]) -> None:
        self._saving.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.error("agents: saving a record failed: %s", fut.exception())

    def _prune(self, uid: int) -> None:
        """Keep at most keep_finished_per_user ended agents of ``uid`` (the newest)."""
        ended = [a for a in self._agents.values() if a.uid == uid and not a.live]
        extra = len(ended) - self.cfg.keep_finished_per_user
        if extra <= 0:
            return
        ended.sort(key=lambda a: a.ended or 0)
        gone = ended[:extra]
        for a in gone:
            del self._agents[a.aid]
        task = asyncio.get_running_loop().create_task(self._forget(gone))
        self._stops.add(task)
        task.add_done_callback(self._stops.discard)

    async def _forget(self, gone: list[Agent]) -> None:
        for a in gone:
            await self.backend.forget(a)
        await asyncio.to_thread(self._records.forget, [a.aid for a in gone])

    def counts(self) -> tuple[int, int]:
        """(live agents, ended agents kept)."""
        live = len(self._live)
        return live, len(self._agents) - live

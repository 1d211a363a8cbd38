"""The ``agent.*`` syscalls: agents, the processes of users that the daemon starts and watches.

An agent runs as its owner (the caller; an administrator may name another user), never as
root.  Only the owner and administrators see or touch it: for everyone else every ``agent.*``
call on it answers NotFound, as for an AID that nobody has.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator

from aiosd.config import AgentsConfig
from aiosd.errors import InvalidParams, PermissionDenied
from aiosd.kernel.agents import Agent, AgentManager, Limits, LogLine, SpawnSpec, signal_name
from aiosd.kernel.manifests import LimitsParams, Manifest, Manifests
from aiosd.kernel.scheduler import Priority
from aiosd.kernel.syscall_base import Emit, Params, Result, syscall
from aiosd.managers.access import AccessManager, Caller, Permission, Role
from aiosd.managers.users import UserDirectory

Aid = Annotated[str, Field(pattern=r"^[0-9a-f]{12}$")]
AgentName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.\-]{0,63}$")]
Arg = Annotated[str, Field(max_length=32768)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]
ToolName = Annotated[str, Field(min_length=1, max_length=256)]
Owner = Annotated[int, Field(ge=0, le=2**32 - 2)] | Annotated[str, Field(max_length=64)]
#: Signals agent.kill may send, by name.
SIGNALS = ("TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT")


class SpawnParams(Params):
    """Parameters of ``agent.spawn``: an installed agent by ``name``, or an ``argv``."""

    name: AgentName | None = None
    argv: Annotated[list[Arg], Field(min_length=1, max_length=4096)] | None = None
    #: Arguments added after an installed agent's own command line (with ``name`` only).
    args: Annotated[list[Arg], Field(max_length=4096)] | None = None
    cwd: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    env: Annotated[dict[EnvName, Arg], Field(max_length=256)] | None = None
    limits: LimitsParams | None = None
    priority: Priority | None = None
    memory_budget: Annotated[int, Field(ge=0, le=1 << 40)] | None = None
    tools: Annotated[list[ToolName], Field(max_length=1024)] | None = None
    label: Annotated[str, Field(max_length=64)] | None = None
    #: The owner, for administrators: a uid or a user name (default: the caller).
    user: (
        Annotated[int, Field(ge=0, le=2**32 - 2)] | Annotated[str, Field(max_length=64)] | None
    ) = None

    @model_validator(mode="after")
    def _one_program(self) -> SpawnParams:
        if (self.name is None) == (self.argv is None):
            raise ValueError("give exactly one of name (an installed agent) and argv")
        if self.argv is not None and not self.argv[0]:
            raise ValueError("argv[0], the program, is empty")
        if self.args is not None and self.name is None:
            raise ValueError("args go with name (an installed agent); put them in argv")
        for key in self.env or {}:
            if key.startswith("AIOSD_"):
                raise ValueError(f"env: {key} is the daemon's to set")
        return self


class AidParams(Params):
    """An agent (``agent.info``, ``agent.suspend``, ``agent.resume``)."""

    aid: Aid


class StopParams(Params):
    """Parameters of ``agent.stop``."""

    aid: Aid
    #: Seconds between SIGTERM and SIGKILL (default: agents.stop_timeout).
    timeout: Annotated[float, Field(ge=0, le=3600)] | None = None


class KillParams(Params):
    """Parameters of ``agent.kill``."""

    aid: Aid
    signal: Annotated[str, Field(max_length=16)] = "KILL"

    @field_validator("signal")
    @classmethod
    def _known_signal(cls, value: str) -> str:
        name = value.upper().removeprefix("SIG")
        if name not in SIGNALS:
            raise ValueError(f"{value!r} is not one of {', '.join(SIGNALS)}")
        return name


class LogsParams(Params):
    """Parameters of ``agent.logs``; with stream=true, new lines follow as notifications
    until the agent has ended."""

    aid: Aid
    tail: Annotated[int, Field(ge=0, le=100_000)] = 100
    stream: bool = False


class WaitParams(Params):
    """Parameters of ``agent.wait``."""

    aid: Aid
    #: Seconds to wait at most (default: until the agent ends).
    timeout: Annotated[float, Field(ge=0, le=1 << 31)] | None = None


class ListParams(Params):
    """Parameters of ``agent.list``."""

    #: Also the agents that have ended (the records kept: agents.keep_finished_per_user).
    ended: bool = True


class AgentLimits(BaseModel):
    """An agent's limits (0: none)."""

    memory_max: int
    tasks_max: int
    runtime_max: float
    cpu_weight: int


class AgentInfo(Result):
    """An agent, as ``agent.info`` shows it (and every syscall that acts on one)."""

    aid: str
    user: str
    uid: int
    label: str
    name: str | None
    argv: list[str]
    cwd: str
    state: str
    pid: int | None
    backend: str
    started: float
    ended: float | None
    exit_code: int | None
    signal: str | None
    reason: str
    priority: str
    memory_space: str
    memory_budget: int
    tools: list[str] | None
    limits: AgentLimits
    cpu_s: float
    rss: int
    max_rss: int
    tasks: int
    tokens_in: int
    tokens_out: int
    syscalls: int


class WaitResult(AgentInfo):
    """Result of ``agent.wait``: the agent, and whether it had ended in time."""

    ended_in_time: bool


class ListResult(Result):
    """Result of ``agent.list``: oldest first."""

    agents: list[AgentInfo]


class LogLineModel(BaseModel):
    """One line of an agent's output."""

    time: float
    stream: str
    text: str


class LogsResult(Result):
    """Result of ``agent.logs``: the last lines (oldest first); with stream=true, the lines
    that followed were notifications, and ``dropped`` counts those lost because the client
    did not keep up."""

    aid: str
    lines: list[LogLineModel]
    followed: int
    dropped: int


class ManifestModel(BaseModel):
    """An installed agent (``agent.toml``)."""

    name: str
    description: str
    exec: list[str]
    source: str
    tools: list[str] | None
    priority: str | None
    memory_budget: int | None
    limits: LimitsParams


class AvailableResult(Result):
    """Result of ``agent.available``: the installed agents the caller may start; one of the
    user's own hides a system one of the same name."""

    agents: list[ManifestModel]
    problems: list[str]


def info(a: Agent) -> AgentInfo:
    """The record ``a`` as a result."""
    return AgentInfo(
        aid=a.aid,
        user=a.user,
        uid=a.uid,
        label=a.label,
        name=a.name,
        argv=a.argv,
        cwd=a.cwd,
        state=a.state,
        pid=a.pid,
        backend=a.backend,
        started=round(a.started, 6),
        ended=round(a.ended, 6) if a.ended is not None else None,
        exit_code=a.exit_code,
        signal=signal_name(a.signal) if a.signal is not None else None,
        reason=a.reason,
        priority=a.priority,
        memory_space=a.space(),
        memory_budget=a.memory_budget,
        tools=a.tools,
        limits=AgentLimits(
            memory_max=a.limits.memory_max,
            tasks_max=a.limits.tasks_max,
            runtime_max=a.limits.runtime_max,
            cpu_weight=a.limits.cpu_weight,
        ),
        cpu_s=round(a.usage.cpu_s, 3),
        rss=a.usage.rss,
        max_rss=a.usage.max_rss,
        tasks=a.usage.tasks,
        tokens_in=a.tokens_in,
        tokens_out=a.tokens_out,
        syscalls=a.syscalls,
    )


def _line_key(line: LogLine) -> tuple[float, str, str]:
    """A line as kept on disk (times to the microsecond), to tell one line read twice."""
    return (round(line.time, 6), line.stream, line.text)


def _where(line: LogLine) -> dict[str, Any]:
    """The members of a line's notification besides ``seq`` and ``content``."""
    return {"stream": line.stream, "time": round(line.time, 6)}


def _who(a: Agent, c: Caller) -> str:
    """Who acts on ``a``, in the words its reason records."""
    return "its owner" if c.uid == a.uid else f"an administrator (uid {c.uid})"


class AgentSyscalls:
    """Handlers of ``agent.*``: the agent manager, the installed agents, the user directory."""

    def __init__(
        self,
        agents: AgentManager,
        manifests: Manifests,
        users: UserDirectory,
        access: AccessManager,
        cfg: Callable[[], AgentsConfig],
    ) -> None:
        self.agents = agents
        self.manifests = manifests
        self.users = users
        self.access = access
        #: () → the current [agents] section (a reload changes it live).
        self._cfg = cfg

    def _admin(self, c: Caller) -> bool:
        return self.access.role(c) is Role.admin

    def _get(self, aid: str, c: Caller) -> Agent:
        return self.agents.get(aid, c.uid, self._admin(c))

    async def _owner(self, p: SpawnParams, c: Caller) -> int:
        if p.user is None:
            return c.uid
        if not self._admin(c):
            raise PermissionDenied("only administrators may start an agent for another user (user)")
        if isinstance(p.user, int):
            return p.user
        uid = await self.users.uid_of(p.user)
        if uid is None:
            raise InvalidParams(f"invalid params: user: no user named {p.user!r}")
        return uid

    def _limits(self, asked: LimitsParams | None, defaults: LimitsParams, admin: bool) -> Limits:
        cfg = self._cfg()
        ceilings = {"memory_max": cfg.memory_max, "tasks_max": cfg.tasks_max}
        ceilings_f = {"runtime_max": cfg.runtime_max}
        out: dict[str, Any] = {}
        for key, ceiling in {**ceilings, **ceilings_f}.items():
            value = getattr(asked, key, None) if asked is not None else None
            if value is None:
                # A manifest's own limit, at most what [agents] allows: only what the caller
                # asks for is refused.
                value = getattr(defaults, key)
                if value is not None and ceiling and not admin and (value == 0 or value > ceiling):
                    value = ceiling
            if value is None:
                value = ceiling
            if not admin and ceiling and (value == 0 or value > ceiling):
                raise InvalidParams(
                    f"invalid params: limits.{key}: {value:g} is beyond what agents may have "
                    f"(agents.{key} {ceiling:g}; 0 is no limit)",
                    data={"errors": [{"field": f"limits.{key}", "message": "above the limit"}]},
                )
            out[key] = value
        weight = (asked.cpu_weight if asked is not None else None) or defaults.cpu_weight or 100
        if weight > 100 and not admin:
            raise InvalidParams(
                "invalid params: limits.cpu_weight: above 100 (a larger share than everyone "
                "else's) is for administrators"
            )
        return Limits(
            memory_max=int(out["memory_max"]),
            tasks_max=int(out["tasks_max"]),
            runtime_max=float(out["runtime_max"]),
            cpu_weight=weight,
        )

    @syscall(
        "agent.spawn",
        SpawnParams,
        AgentInfo,
        Permission.user,
        "Start an agent (an installed one by name, or a command line) as your own process.",
    )
    async def spawn(self, p: SpawnParams, c: Caller, emit: Emit | None) -> Result:
        """``agent.spawn``."""
        admin = self._admin(c)
        uid = await self._owner(p, c)
        if uid == 0:
            raise InvalidParams(
                "invalid params: agents never run as root; an administrator names their "
                "owner with user"
            )
        account = await self.users.account(uid)
        manifest: Manifest | None = None
        if p.name is not None:
            manifest = await self.manifests.find(account, p.name)
            argv = manifest.argv() + list(p.args or [])
        else:
            assert p.argv is not None
            argv = list(p.argv)
        defaults = manifest.limits if manifest is not None else LimitsParams()
        prio = p.priority or (manifest.priority if manifest else None) or Priority.normal
        spec = SpawnSpec(
            account=account,
            argv=argv,
            cwd=p.cwd,
            env=dict(p.env or {}),
            limits=self._limits(p.limits, defaults, admin),
            label=p.label if p.label is not None else (p.name or argv[0].rsplit("/", 1)[-1]),
            name=p.name,
            priority=Priority(prio).value,
            memory_budget=p.memory_budget
            if p.memory_budget is not None
            else (manifest.memory_budget if manifest and manifest.memory_budget else 0),
            tools=p.tools if p.tools is not None else (manifest.tools if manifest else None),
        )
        return info(await self.agents.spawn(spec, admin))

    @syscall(
        "agent.list",
        ListParams,
        ListResult,
        Permission.user,
        "Your agents (administrators: everyone's), oldest first.",
    )
    def list(self, p: ListParams, c: Caller, emit: Emit | None) -> Result:
        """``agent.list``."""
        admin = self._admin(c)
        shown = [
            self.agents.get(a.aid, c.uid, admin)
            for a in self.agents.visible(c.uid, admin)
            if p.ended or a.live
        ]
        return ListResult(agents=[info(a) for a in shown])

    @syscall("agent.info", AidParams, AgentInfo, Permission.user, "One agent, in full.")
    def info(self, p: AidParams, c: Caller, emit: Emit | None) -> Result:
        """``agent.info``."""
        return info(self._get(p.aid, c))

    @syscall(
        "agent.stop",
        StopParams,
        AgentInfo,
        Permission.user,
        "Stop an agent: SIGTERM, then SIGKILL after a grace period; answers once it has ended.",
    )
    async def stop(self, p: StopParams, c: Caller, emit: Emit | None) -> Result:
        """``agent.stop``."""
        a = self._get(p.aid, c)
        await self.agents.stop(a, p.timeout, f"stopped by {_who(a, c)}")
        return info(self._get(p.aid, c))

    @syscall(
        "agent.kill",
        KillParams,
        AgentInfo,
        Permission.user,
        "Send a signal to every process of an agent.",
    )
    def kill(self, p: KillParams, c: Caller, emit: Emit | None) -> Result:
        """``agent.kill``."""
        a = self._get(p.aid, c)
        self.agents.kill(a, signal.Signals[f"SIG{p.signal}"], f"SIG{p.signal} from {_who(a, c)}")
        return info(a)

    @syscall("agent.suspend", AidParams, AgentInfo, Permission.user, "Freeze an agent.")
    async def suspend(self, p: AidParams, c: Caller, emit: Emit | None) -> Result:
        """``agent.suspend``."""
        return info(await self.agents.suspend(self._get(p.aid, c)))

    @syscall("agent.resume", AidParams, AgentInfo, Permission.user, "Thaw a frozen agent.")
    async def resume(self, p: AidParams, c: Caller, emit: Emit | None) -> Result:
        """``agent.resume``."""
        return info(await self.agents.resume(self._get(p.aid, c)))

    @syscall(
        "agent.wait",
        WaitParams,
        WaitResult,
        Permission.user,
        "Wait until an agent has ended (at most timeout seconds); its exit status.",
    )
    async def wait(self, p: WaitParams, c: Caller, emit: Emit | None) -> Result:
        """``agent.wait``."""
        a = self._get(p.aid, c)
        ended = await self.agents.wait(a, p.timeout)
        return WaitResult(**info(self._get(p.aid, c)).model_dump(), ended_in_time=ended)

    @syscall(
        "agent.logs",
        LogsParams,
        LogsResult,
        Permission.user,
        "An agent's last lines of output; with stream=true, the lines that follow too.",
        streams=True,
    )
    async def logs(self, p: LogsParams, c: Caller, emit: Emit | None) -> Result:
        """``agent.logs``."""
        a = self._get(p.aid, c)
        backend = self.agents.backend
        # Following first, then the kept lines: a line written in between is in both (and
        # sent once), never in neither.
        # (Following an agent that has ended gives its kept lines and nothing more.)
        following = backend.follow(a) if p.stream and emit is not None else None
        lines = await backend.logs(a, p.tail) if p.tail else []
        kept = {_line_key(x) for x in lines}
        followed = dropped = 0
        if following is not None:
            assert emit is not None
            # The kept lines first, as notifications too: a client that prints notifications
            # gets every line once, in order.
            seq = 0
            for line in lines:
                await emit({"seq": seq, "content": line.text, **_where(line)})
                seq += 1
            async for item in following:
                if isinstance(item, int):
                    dropped += item
                    await emit({"seq": seq, "content": "", "dropped": item})
                elif _line_key(item) not in kept:
                    await emit({"seq": seq, "content": item.text, **_where(item)})
                    followed += 1
                else:
                    continue
                seq += 1
        return LogsResult(
            aid=a.aid,
            lines=[LogLineModel(**line.public()) for line in lines],
            followed=followed,
            dropped=dropped,
        )

    @syscall(
        "agent.available",
        Params,
        AvailableResult,
        Permission.user,
        "The installed agents you may start by name.",
    )
    async def available(self, p: Params, c: Caller, emit: Emit | None) -> Result:
        """``agent.available``."""
        account = await self.users.account(c.uid)
        found, problems = await self.manifests.all(account)
        return AvailableResult(
            agents=[ManifestModel(**m.public()) for m in found], problems=problems
        )

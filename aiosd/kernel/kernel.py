"""The kernel: owns the managers, the scheduler and the models; runs with no front-end at all."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiosd.config import Config
from aiosd.errors import AiosError, ShuttingDown
from aiosd.kernel.agents import Agent, AgentManager
from aiosd.kernel.agents import Backend as AgentBackend
from aiosd.kernel.dispatch import SyscallPath
from aiosd.kernel.families.agent import AgentSyscalls
from aiosd.kernel.families.llm import ChatService, LlmSyscalls
from aiosd.kernel.families.memory import MemorySyscalls
from aiosd.kernel.families.storage import StorageSyscalls
from aiosd.kernel.families.system import State, SystemSyscalls
from aiosd.kernel.families.tool import ToolSyscalls
from aiosd.kernel.llm.base import Backend
from aiosd.kernel.llm.registry import Models, build_backend
from aiosd.kernel.manifests import Manifests
from aiosd.kernel.scheduler import Scheduler
from aiosd.kernel.syscall_base import Emit, Syscall
from aiosd.kernel.syscalls import SYSCALLS
from aiosd.kernel.toolloop import ToolLoop
from aiosd.managers import builtin_tools
from aiosd.managers.access import AccessManager, Caller
from aiosd.managers.context import ContextManager
from aiosd.managers.mcp import McpTools
from aiosd.managers.memory import MemoryManager
from aiosd.managers.storage import Limits, StorageManager
from aiosd.managers.tools import ToolManager
from aiosd.managers.users import UserDirectory
from aiosd.osbridge.workers import WorkerPool

log = logging.getLogger(__name__)

#: How long a reload waits for the access groups' NSS look-ups (seconds).
NSS_TIMEOUT = 10.0

#: What :meth:`Kernel.dispatch` returns: finished at once (``done()``) or a running task.
Call = asyncio.Future[dict[str, Any]]


class Kernel:
    """Everything the daemon does, reachable through :meth:`dispatch`."""

    def __init__(
        self,
        config: Config,
        *,
        backends: dict[str, Backend] | None = None,
        syscalls: Mapping[str, Syscall] | None = None,
        families: Mapping[type, object] | None = None,
    ) -> None:
        """Build every manager; ``syscalls`` and ``families`` replace or add to the table
        (tests declare syscalls of their own that way)."""
        self.config = config
        self.access = AccessManager(config.access)
        self.scheduler = Scheduler(
            config.scheduler.queue_size,
            on_change=self.changed,
            max_queued_per_user=config.scheduler.max_queued_per_user,
        )
        #: Called (on the event loop) whenever the state, the queue or the connections change.
        self.listeners: list[Callable[[], None]] = []
        self.models = Models(
            backends
            if backends is not None
            else {name: build_backend(name, m) for name, m in config.llm.models.items()},
            config.llm.default_model,
        )
        self.users = UserDirectory()
        st = config.storage
        self.storage = StorageManager(
            config.state_dir() / "storage",
            st.durability,
            Limits(st.quota_bytes, st.quota_entries, st.retention),
            st.max_open_stores,
        )
        self.memory = MemoryManager(self.storage, config.memory)
        #: The context manager (chat sessions), built on the memory manager.
        self.context = ContextManager(self.memory)
        #: Agents: the processes of users the daemon starts and watches.
        self.agents = AgentManager(
            config.agents,
            config.state_dir(),
            agent_backend(config),
            lambda: str(self.config.socket_path()),
        )
        self.manifests = Manifests(config.agents.directories)
        #: Tools: the registry, user workers, consent.
        self.tools = ToolManager(
            lambda: self.config.tools,
            WorkerPool(lambda: self.config.tools),
            self.storage,
            self.access,
            self._tools_of,
        )
        builtin_tools.register(self.tools)
        #: MCP servers: each user's instances, a source of tools.
        self.mcp = McpTools(lambda: self.config.tools, self.tools.workers, self.users.account)
        self.tools.sources = self.mcp.tools
        self.tools.on_close.append(self.mcp.close)
        self.agents.listeners.append(self._agent_changed)
        self._cleanups: set[asyncio.Task[None]] = set()
        self.state: State = "starting"
        self.started_at = time.monotonic()
        self.pid = os.getpid()  # a syscall each time otherwise; the daemon never forks
        self.connections = 0
        self._inflight: set[asyncio.Task[dict[str, Any]]] = set()
        self._reloading = asyncio.Lock()
        #: The syscall table this kernel serves.
        self.syscalls: Mapping[str, Syscall] = SYSCALLS if syscalls is None else syscalls
        chat = ChatService(self.models, self.scheduler, self.context, self.agents)
        self._path = SyscallPath(
            self.access,
            self.syscalls,
            {
                LlmSyscalls: LlmSyscalls(
                    chat,
                    self.models,
                    ToolLoop(chat, self.tools, self.users, self._as_caller).run,
                ),
                SystemSyscalls: SystemSyscalls(self, self.scheduler, self.models, self.access),
                StorageSyscalls: StorageSyscalls(
                    self.storage, self.users, lambda: self.config.storage.max_value_bytes
                ),
                MemorySyscalls: MemorySyscalls(self.memory, self.access),
                AgentSyscalls: AgentSyscalls(
                    self.agents, self.manifests, self.users, self.access, lambda: self.config.agents
                ),
                ToolSyscalls: ToolSyscalls(self.tools, self.users, self._as_caller),
                **(families or {}),
            },
        )

    def _tools_of(self, caller: Caller) -> list[str] | None:
        """The tools the caller's agent may use (None: any; not an agent: any)."""
        if caller.aid is None:
            return None
        return self.agents.tools_of(caller.aid)  # ["*"] when the agent has no list

    async def _as_caller(self, name: str, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """A syscall made for ``caller`` by the daemon itself (a tool that is a syscall)."""
        return await self.dispatch(name, params, caller)

    # --- lifecycle ----------------------------------------------------------------------------

    def changed(self) -> None:
        """Tell the front-ends that something they show has changed (never raises: the
        scheduler calls this while it hands out slots)."""
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:
                log.exception("a change listener failed")

    def _set_state(self, state: State) -> None:
        self.state = state
        self.changed()

    async def start(self) -> None:
        """Load or connect every model; the kernel is usable when this returns."""
        await self.agents.open()
        for name, backend in self.backends.items():
            await backend.start()
            self.scheduler.add_model(name, backend.slots)
        self._set_state("running")

    async def reload(self, config: Config) -> list[str]:
        """Apply a new config where it can be applied live; return what needs a restart.

        Reloads run one at a time, and never once a stop has begun (that raises
        ShuttingDown): a reload must not turn a stopping kernel back to running.
        """
        async with self._reloading:
            if self.state == "stopping":
                raise ShuttingDown("the daemon is stopping; the reload was not applied")
            before = self.state
            self._set_state("reloading")
            try:
                return await self._apply(config)
            finally:
                if self.state == "reloading":
                    self._set_state(before)

    async def _apply(self, config: Config) -> list[str]:
        needs_restart = [
            section
            for section in ("socket", "llm", "dbus")
            if getattr(config, section) != getattr(self.config, section)
        ]
        # Storage limits are read when a user's store opens; max_value_bytes applies live.
        unchanged = {"max_value_bytes": 0}
        if config.storage.model_copy(update=unchanged) != self.config.storage.model_copy(
            update=unchanged
        ):
            needs_restart.append("storage")
        if (config.daemon.state_directory, config.daemon.runtime_directory) != (
            self.config.daemon.state_directory,
            self.config.daemon.runtime_directory,
        ):
            needs_restart.append("daemon")
        self.access.configure(config.access, *await self._access_gids(config))
        self.memory.configure(config.memory)
        if config.agents.backend != self.config.agents.backend:
            needs_restart.append("agents")
        self.agents.configure(config.agents)
        self.manifests.directories = Manifests(config.agents.directories).directories
        self.scheduler.set_queue_size(
            config.scheduler.queue_size, config.scheduler.max_queued_per_user
        )
        self.config = config
        return needs_restart

    async def _access_gids(self, config: Config) -> tuple[int | None, int | None]:
        """The access groups' gids, through NSS off the loop (it may be LDAP), fresh."""
        names = (config.access.admin_group, config.access.user_group)
        try:
            admin, user = await asyncio.wait_for(
                asyncio.gather(*(self.users.gid_of(n, fresh=True) for n in names)),
                NSS_TIMEOUT,
            )
        except (TimeoutError, OSError) as exc:
            old = self.access.cfg
            if (old.admin_group, old.user_group) != names:
                raise AiosError(
                    f"cannot look up the groups {names[0]!r} and {names[1]!r}: {exc!r}"
                ) from None
            log.warning(
                "reload: looking up groups %r and %r failed (%r): keeping their gids",
                *names,
                exc,
            )
            return self.access.gids()
        return admin, user

    @property
    def backends(self) -> Mapping[str, Backend]:
        """The configured models' backends, by name (owned by :attr:`models`)."""
        return self.models.backends

    def running(self) -> list[str]:
        """The requests in flight, by name (syscall, caller), for a stop that waits on them."""
        return sorted(t.get_name() for t in self._inflight if not t.done())

    async def stop(self, drain_timeout: float, close_timeout: float) -> None:
        """Refuse new work, let running generations finish for ``drain_timeout``, then cancel."""
        # Agents first, while the kernel still serves them: told to stop (SIGTERM), they may
        # still save their work through their syscalls.
        await self.agents.close(self.config.agents.stop_timeout)
        self._set_state("stopping")
        await _closing(self.tools.close, close_timeout, "stopping tool workers")
        self.scheduler.close()
        pending = {t for t in self._inflight if not t.done()}
        if pending:
            log.info("waiting up to %.1fs for %d request(s) to finish", drain_timeout, len(pending))
            _, pending = await asyncio.wait(pending, timeout=drain_timeout)
        if pending:
            log.warning(
                "cancelling %d request(s) still running after %.1fs: %s",
                len(pending),
                drain_timeout,
                ", ".join(self.running()),
            )
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=close_timeout)
            if pending:
                log.warning(
                    "request(s) still running %.1fs after being cancelled: %s",
                    close_timeout,
                    ", ".join(self.running()),
                )
        # Short-term memory ends with the daemon; pinned entries are kept in storage.
        await _closing(self.memory.persist_pinned, close_timeout, "keeping pinned memory")
        await _closing(self.storage.close, close_timeout, "closing storage")
        for backend in self.backends.values():
            await _closing(backend.close, close_timeout, f"closing model {backend.name}")
        self.users.close()

    # --- the one entry point ------------------------------------------------------------------

    def dispatch(self, name: str, params: Any, caller: Caller, emit: Emit | None = None) -> Call:
        """Validate, authorize, route and audit one syscall (see kernel/dispatch.py).

        Raises AiosError when the call is refused before it runs.  Otherwise returns a future
        of its JSON-ready result: already done when the handler had nothing to wait for (no
        task was made), else the task that finishes it, counted as in flight from now on (a
        stop drains or cancels it).  Call it on the event loop.
        """
        if self.state == "stopping":
            raise ShuttingDown("the daemon is stopping and takes no new requests")
        if caller.aid is not None:
            self.agents.count_syscall(caller.aid)
        out = self._path.run(name, params, caller, emit)
        loop = asyncio.get_running_loop()
        if isinstance(out, dict):
            done: Call = loop.create_future()
            done.set_result(out)
            return done
        # Named after what it serves, so a stop that has to wait can say for what.
        task = loop.create_task(out, name=f"{name} (uid {caller.uid}, pid {caller.pid})")
        # Counted now, not when the task first runs: a stop that begins in between sees it.
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return task

    async def session_closed(self, caller: Caller) -> None:
        """A client session ended: its short-term memory goes (pinned entries stay), and
        its tool grants."""
        self.tools.session_closed(caller)
        if caller.session is not None and self.state != "stopping":
            await self.memory.drop_session(caller.uid, caller.session)

    def _agent_changed(self, agent: Agent) -> None:
        """A running agent's space holds at most its memory_budget; an agent that has ended
        leaves its short-term memory as a closed session does: unpinned entries go, pinned
        ones stay (in storage, under its space's name)."""
        if agent.live:
            if agent.memory_budget:
                self.memory.set_budget(agent.uid, agent.space(), agent.memory_budget)
            return
        self.memory.set_budget(agent.uid, agent.space(), None)
        if self.state == "stopping":
            return
        task = asyncio.get_running_loop().create_task(
            self.memory.drop_session(agent.uid, agent.space())
        )
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        running, waiting = self.scheduler.totals()
        return (
            f"{len(self.backends)} model(s), {running} running, {waiting} waiting, "
            f"{self.connections} connection(s)"
        )


def agent_backend(config: Config) -> AgentBackend:
    """The backend ``[agents] backend`` names; "auto": systemd when it is PID 1."""
    from aiosd.osbridge.agents_subprocess import SubprocessBackend

    choice = config.agents.backend
    if choice == "auto":
        choice = "systemd" if os.path.isdir("/run/systemd/system") else "subprocess"
    if choice == "systemd":
        try:
            from aiosd.osbridge.agents_systemd import SystemdBackend
        except ImportError as exc:
            log.warning("agents: the systemd backend cannot be used (%s): subprocess", exc)
        else:
            return SystemdBackend(config.agents, config.state_dir() / "agents")
    return SubprocessBackend(config.agents, config.state_dir() / "agents")


async def _closing(step: Callable[[], Awaitable[Any]], timeout: float, what: str) -> None:
    """Run one step of a stop for at most ``timeout``; log (never raise) if it fails."""
    try:
        await asyncio.wait_for(step(), timeout=timeout)
    except TimeoutError:
        log.warning("stop: %s did not finish within %.1fs", what, timeout)
    except Exception:
        log.exception("stop: %s failed", what)

"""The ``system.*`` syscalls: what the daemon is doing, for anyone with a role.

Who asked for what, and when, is for the asker and the administrators to know:
``system.queue`` shows a user their own requests in full and only counts of everyone else's
(``system.status`` has counts only).
"""

from __future__ import annotations

import time
from typing import Literal, Protocol

from pydantic import BaseModel

from aiosd import __version__
from aiosd.kernel.agents import AgentManager
from aiosd.kernel.llm.registry import Models
from aiosd.kernel.scheduler import Priority, QueueView, Scheduler
from aiosd.kernel.syscall_base import Emit, NoParams, Result, syscall
from aiosd.managers.access import AccessManager, Caller, Permission, Role

State = Literal["starting", "running", "reloading", "stopping"]


class RunningEntry(BaseModel):
    """A request holding a slot."""

    request_id: int
    uid: int
    pid: int
    priority: str
    slot: int | None
    waited_ms: float
    running_ms: float


class WaitingEntry(BaseModel):
    """A request waiting for a slot, at ``position`` in its model's queue."""

    request_id: int
    position: int
    uid: int
    pid: int
    priority: str
    waited_ms: float


class PriorityCount(BaseModel):
    """How many requests of one priority class run and wait, whoever made them."""

    priority: str
    running: int
    waiting: int


class QueueModel(BaseModel):
    """One model's queue."""

    model: str
    slots: int
    served: int
    running_total: int
    waiting_total: int
    by_priority: list[PriorityCount]
    running: list[RunningEntry]
    waiting: list[WaitingEntry]


class QueueResult(Result):
    """Result of ``system.queue``: running and waiting requests per model (a caller who is
    no administrator: their own requests, and counts of everyone's)."""

    models: list[QueueModel]


class StatusResult(Result):
    """Result of ``system.status``."""

    version: str
    pid: int
    uptime_s: float
    state: State
    models: list[str]
    default_model: str
    running: int
    waiting: int
    connections: int
    caller_uid: int
    caller_role: str
    #: The agent the calling process is part of, as the daemon sees it (never as it says).
    caller_aid: str | None
    agents_backend: str
    agents_running: int


class DaemonState(Protocol):
    """What the system syscalls read of the kernel itself."""

    @property
    def state(self) -> State:
        """Where the kernel is in its life."""

    @property
    def started_at(self) -> float:
        """When it started (``time.monotonic()``)."""

    @property
    def pid(self) -> int:
        """The daemon's process id."""

    @property
    def connections(self) -> int:
        """Open socket connections (bus clients share the daemon's one bus connection)."""

    @property
    def agents(self) -> AgentManager:
        """The agents."""


class SystemSyscalls:
    """Handlers of ``system.*``: they read the kernel's state, queue, models and access."""

    def __init__(
        self, daemon: DaemonState, scheduler: Scheduler, models: Models, access: AccessManager
    ) -> None:
        self.daemon = daemon
        self.scheduler = scheduler
        self.models = models
        self.access = access

    @syscall(
        "system.status",
        NoParams,
        StatusResult,
        Permission.user,
        "Version, uptime, models and queue totals.",
    )
    def status(self, p: NoParams, c: Caller, emit: Emit | None) -> Result:
        """``system.status``."""
        running, waiting = self.scheduler.totals()
        d = self.daemon
        return StatusResult(
            version=__version__,
            pid=d.pid,
            uptime_s=round(time.monotonic() - d.started_at, 3),
            state=d.state,
            models=self.models.names(),
            default_model=self.models.default,
            running=running,
            waiting=waiting,
            connections=d.connections,
            caller_uid=c.uid,
            caller_role=self.access.role(c).value,
            caller_aid=c.aid,
            agents_backend=d.agents.backend.name,
            agents_running=d.agents.counts()[0],
        )

    @syscall(
        "system.queue",
        NoParams,
        QueueResult,
        Permission.user,
        "Running and waiting LLM requests per model, in queue order.",
    )
    def queue(self, p: NoParams, c: Caller, emit: Emit | None) -> Result:
        """``system.queue``."""
        everyone = self.access.role(c) is Role.admin
        return QueueResult(
            models=[
                _queue_model(name, v, None if everyone else c.uid)
                for name, v in self.scheduler.view().items()
            ],
        )


def _queue_model(name: str, v: QueueView, uid: int | None) -> QueueModel:
    """One model's queue as ``uid`` may see it (None: every request, for an administrator)."""
    running, waiting = v["running"], v["waiting"]
    counts = {prio.value: [0, 0] for prio in Priority}
    for r in running:
        counts[r["priority"]][0] += 1
    for w in waiting:
        counts[w["priority"]][1] += 1
    return QueueModel(
        model=name,
        slots=v["slots"],
        served=v["served"],
        running_total=len(running),
        waiting_total=len(waiting),
        by_priority=[
            PriorityCount(priority=prio, running=n_run, waiting=n_wait)
            for prio, (n_run, n_wait) in counts.items()
        ],
        # Another user's uid, pid and timings say who uses the model and when: not shown.
        running=[RunningEntry(**r) for r in running if uid is None or r["uid"] == uid],
        waiting=[WaitingEntry(**w) for w in waiting if uid is None or w["uid"] == uid],
    )

"""LLM request scheduler, v1: one bounded queue per model, priority classes, N slots.

Requests wait in priority-then-arrival order (interactive before normal before batch, FIFO
within a class).  Each model has ``slots`` parallel generations; a request holds one slot
from the moment it starts until its generation has fully stopped.

Queue places are shared fairly: one user holds at most ``max_queued_per_user`` of a model's
waiting places, and a full queue makes room only at the expense of a user who holds more
places than the newcomer's user (their newest request of their lowest class goes, with
:class:`~aiosd.errors.Busy`), or of the newcomer's own lower-class request; otherwise the
newcomer is turned away.  So no one can push out the requests of a user holding fewer
places than them, and a user with none (an administrator, say) always finds room while
anyone holds two or more.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypedDict

from aiosd.errors import Busy, ModelNotFound, ShuttingDown


class Priority(StrEnum):
    """Priority classes, best first."""

    interactive = "interactive"
    normal = "normal"
    batch = "batch"

    @property
    def rank(self) -> int:
        """0 for the most urgent class."""
        return _RANK[self]


_RANK = {p: i for i, p in enumerate(Priority)}


@dataclass(eq=False)
class Ticket:
    """One LLM request's place in a model's queue, then its slot."""

    id: int
    model: str
    uid: int
    pid: int
    priority: Priority
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    slot: int | None = None
    future: asyncio.Future[int] | None = None

    @property
    def sort_key(self) -> tuple[int, int]:
        """Priority class first, then arrival."""
        return (self.priority.rank, self.id)


class RunningView(TypedDict):
    """A running request, as ``system.queue`` shows it."""

    request_id: int
    uid: int
    pid: int
    priority: str
    slot: int | None
    waited_ms: float
    running_ms: float


class WaitingView(TypedDict):
    """A waiting request and its place in the queue."""

    request_id: int
    position: int
    uid: int
    pid: int
    priority: str
    waited_ms: float


class QueueView(TypedDict):
    """One model's slots and queue."""

    slots: int
    served: int
    running: list[RunningView]
    waiting: list[WaitingView]


def _gone(ticket: Ticket) -> bool:
    """A waiter cancelled a moment ago stays listed until its task runs."""
    return ticket.future is not None and ticket.future.done()


@dataclass
class _ModelQueue:
    slots: int
    free: list[int]
    waiting: list[Ticket] = field(default_factory=list)
    running: dict[int, Ticket] = field(default_factory=dict)
    served: int = 0


class Scheduler:
    """Queues and slots for every configured model."""

    def __init__(
        self,
        queue_size: int,
        on_change: Callable[[], None] | None = None,
        max_queued_per_user: int | None = None,
    ) -> None:
        self.queue_size = queue_size
        self.max_queued_per_user = max_queued_per_user or queue_size
        self._on_change = on_change
        self._queues: dict[str, _ModelQueue] = {}
        self._ids = itertools.count(1)
        self._closed = False

    def add_model(self, name: str, slots: int) -> None:
        """Give a model its queue and ``slots`` generation slots."""
        self._queues[name] = _ModelQueue(slots=slots, free=list(range(slots)))

    @asynccontextmanager
    async def slot(
        self, model: str, uid: int, pid: int, priority: Priority
    ) -> AsyncIterator[Ticket]:
        """Wait for a slot of ``model``; hold it for the body of the ``async with``."""
        ticket = await self._acquire(model, uid, pid, priority)
        try:
            yield ticket
        finally:
            self._release(ticket)
            self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    async def _acquire(self, model: str, uid: int, pid: int, priority: Priority) -> Ticket:
        if self._closed:
            raise ShuttingDown("the daemon is stopping and takes no new requests")
        q = self._queues.get(model)
        if q is None:
            raise ModelNotFound(f"no model named {model!r} is configured")
        ticket = Ticket(id=next(self._ids), model=model, uid=uid, pid=pid, priority=priority)
        if not q.waiting and q.free:
            self._start(q, ticket, q.free.pop(0))
            self._changed()
            return ticket
        mine = sum(1 for t in q.waiting if t.uid == uid and not _gone(t))
        if mine >= self.max_queued_per_user and not self._replace_own(q, ticket):
            raise Busy(
                f"uid {uid} already has {mine} requests waiting for model {model!r} "
                f"(limit {self.max_queued_per_user}, scheduler.max_queued_per_user); "
                "try again later",
                data={"queue_length": mine, "limit": self.max_queued_per_user, "scope": "user"},
            )
        if len(q.waiting) >= self.queue_size:
            self._make_room(q, ticket, mine)
        ticket.future = asyncio.get_running_loop().create_future()
        bisect.insort(q.waiting, ticket, key=lambda t: t.sort_key)
        self._changed()
        try:
            await ticket.future
        except asyncio.CancelledError:
            if ticket in q.waiting:
                q.waiting.remove(ticket)
                self._changed()
            elif ticket.slot is not None:
                # Granted in the same tick we were cancelled: give the slot back.
                self._release(ticket)
                self._changed()
            raise
        return ticket

    def _make_room(self, q: _ModelQueue, newcomer: Ticket, mine: int) -> None:
        """Turn away a waiting request of a user holding more places than the newcomer's
        user (``mine`` places), or the newcomer's own lower-class one, or the newcomer."""
        live = [t for t in q.waiting if not _gone(t)]
        held: dict[int, int] = {}
        for t in live:
            held[t.uid] = held.get(t.uid, 0) + 1
        heavy = [u for u, n in held.items() if u != newcomer.uid and n > mine + 1]
        victim: Ticket | None = None
        if heavy:
            most = max(held[u] for u in heavy)
            # The sorted list ends with the newest request of the lowest class.
            victim = next(t for t in reversed(live) if held[t.uid] == most and t.uid in heavy)
        elif self._replace_own(q, newcomer):
            return
        busy = Busy(
            f"the queue of model {newcomer.model!r} is full "
            f"({len(q.waiting)} waiting, limit {self.queue_size}); try again later",
            data={"queue_length": len(q.waiting), "limit": self.queue_size, "scope": "model"},
        )
        if victim is None:
            raise busy
        q.waiting.remove(victim)
        assert victim.future is not None
        victim.future.set_exception(busy)

    def _replace_own(self, q: _ModelQueue, newcomer: Ticket) -> bool:
        """Turn away the newcomer's user's own newest waiting request of a class below the
        newcomer's, if there is one, to make room for it."""
        own = next((t for t in reversed(q.waiting) if t.uid == newcomer.uid and not _gone(t)), None)
        if own is None or newcomer.priority.rank >= own.priority.rank:
            return False
        q.waiting.remove(own)
        assert own.future is not None
        own.future.set_exception(
            Busy(
                f"request {own.id} was replaced by a request of a better class of the same "
                f"user (queue of model {newcomer.model!r} full); try again later",
                data={"queue_length": len(q.waiting), "limit": self.queue_size, "scope": "own"},
            )
        )
        return True

    def _start(self, q: _ModelQueue, ticket: Ticket, slot: int) -> None:
        ticket.slot = slot
        ticket.started = time.monotonic()
        q.running[ticket.id] = ticket

    def _release(self, ticket: Ticket) -> None:
        q = self._queues[ticket.model]
        if q.running.pop(ticket.id, None) is None:
            return
        assert ticket.slot is not None
        q.free.append(ticket.slot)
        q.served += 1
        while q.free and q.waiting:
            nxt = q.waiting.pop(0)
            assert nxt.future is not None
            if nxt.future.done():  # cancelled, its task has not run yet: skip it
                continue
            self._start(q, nxt, q.free.pop(0))
            nxt.future.set_result(nxt.slot or 0)

    def close(self) -> None:
        """Refuse new requests and turn away every waiting one."""
        self._closed = True
        for q in self._queues.values():
            waiting, q.waiting = q.waiting, []
            for t in waiting:
                if t.future is not None and not t.future.done():
                    t.future.set_exception(
                        ShuttingDown("the daemon is stopping; the request was not started")
                    )

    def set_queue_size(self, size: int, per_user: int | None = None) -> None:
        """Change the queue limits (on reload); already waiting requests stay."""
        self.queue_size = size
        self.max_queued_per_user = per_user or size

    def totals(self) -> tuple[int, int]:
        """(running, waiting) over all models."""
        qs = self._queues.values()
        return sum(len(q.running) for q in qs), sum(len(q.waiting) for q in qs)

    def view(self) -> dict[str, QueueView]:
        """The queue state for ``system.queue`` and ``system.status``."""
        now = time.monotonic()
        out: dict[str, QueueView] = {}
        for name, q in self._queues.items():
            out[name] = QueueView(
                slots=q.slots,
                served=q.served,
                running=[
                    RunningView(
                        request_id=t.id,
                        uid=t.uid,
                        pid=t.pid,
                        priority=t.priority.value,
                        slot=t.slot,
                        waited_ms=round(((t.started or now) - t.enqueued) * 1000, 1),
                        running_ms=round((now - (t.started or now)) * 1000, 1),
                    )
                    for t in sorted(q.running.values(), key=lambda t: t.id)
                ],
                waiting=[
                    WaitingView(
                        request_id=t.id,
                        position=i + 1,
                        uid=t.uid,
                        pid=t.pid,
                        priority=t.priority.value,
                        waited_ms=round((now - t.enqueued) * 1000, 1),
                    )
                    for i, t in enumerate(q.waiting)
                ],
            )
        return out

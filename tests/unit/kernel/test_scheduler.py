"""Scheduler v1: priority classes, FIFO within a class, slots, a bounded queue."""

from __future__ import annotations

import asyncio

import pytest

from aiosd.errors import Busy, ShuttingDown
from aiosd.kernel.scheduler import Priority, Scheduler


async def _hold(
    sched: Scheduler,
    order: list[int],
    tag: int,
    prio: Priority,
    release: asyncio.Event,
    uid: int | None = None,
) -> None:
    async with sched.slot("m", uid=1000 + tag if uid is None else uid, pid=tag, priority=prio):
        order.append(tag)
        await release.wait()


def test_waiting_requests_start_in_priority_then_arrival_order() -> None:
    async def main() -> tuple[list[int], list[str]]:
        sched = Scheduler(queue_size=16)
        sched.add_model("m", slots=1)
        order: list[int] = []
        gates = {i: asyncio.Event() for i in range(7)}
        tasks = [asyncio.create_task(_hold(sched, order, 0, Priority.normal, gates[0]))]
        await asyncio.sleep(0)
        prios = [
            Priority.batch,
            Priority.normal,
            Priority.batch,
            Priority.interactive,
            Priority.normal,
            Priority.interactive,
        ]
        for i, prio in enumerate(prios, start=1):
            tasks.append(asyncio.create_task(_hold(sched, order, i, prio, gates[i])))
            await asyncio.sleep(0)
        view = sched.view()["m"]
        waiting = [w["priority"] for w in view["waiting"]]  # type: ignore[union-attr]
        for i in range(7):
            gates[i].set()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        return order, waiting

    order, waiting = asyncio.run(main())
    assert order == [0, 4, 6, 2, 5, 1, 3]
    assert waiting == ["interactive", "interactive", "normal", "normal", "batch", "batch"]


def test_slots_limit_parallel_generations() -> None:
    async def main() -> int:
        sched = Scheduler(queue_size=16)
        sched.add_model("m", slots=2)
        peak = 0
        running = 0

        async def work() -> None:
            nonlocal peak, running
            async with sched.slot("m", 0, 0, Priority.normal) as ticket:
                assert ticket.slot in (0, 1)
                running += 1
                peak = max(peak, running)
                await asyncio.sleep(0.01)
                running -= 1

        await asyncio.gather(*(work() for _ in range(8)))
        return peak

    assert asyncio.run(main()) == 2


def test_full_queue_rejects_newest_lowest_priority() -> None:
    async def main() -> tuple[str, str, int]:
        sched = Scheduler(queue_size=2)
        sched.add_model("m", slots=1)
        gate = asyncio.Event()
        order: list[int] = []
        t0 = asyncio.create_task(_hold(sched, order, 0, Priority.normal, gate))
        await asyncio.sleep(0)
        # One user's requests (others' are never pushed out for an equal holder: see
        # test_queue_bounds.py).
        u = 2000
        t1 = asyncio.create_task(_hold(sched, order, 1, Priority.batch, gate, uid=u))
        t2 = asyncio.create_task(_hold(sched, order, 2, Priority.batch, gate, uid=u))
        await asyncio.sleep(0)
        # A third batch request: the newcomer itself is turned away.
        with pytest.raises(Busy) as newcomer:
            await _hold(sched, order, 3, Priority.batch, gate, uid=u)
        # An interactive one: the user's own newest batch request (2) makes room.
        t4 = asyncio.create_task(_hold(sched, order, 4, Priority.interactive, gate, uid=u))
        await asyncio.sleep(0)
        with pytest.raises(Busy) as evicted:
            await t2
        gate.set()
        await asyncio.gather(t0, t1, t4)
        assert order == [0, 4, 1]
        return newcomer.value.message, evicted.value.message, newcomer.value.data["queue_length"]

    msg_new, msg_evicted, length = asyncio.run(main())
    assert "limit 2" in msg_new  # the queue and this user's share of it are both full
    assert "full" in msg_evicted
    assert length == 2


def test_cancelled_waiter_leaves_the_queue_and_running_one_frees_its_slot() -> None:
    async def main() -> None:
        sched = Scheduler(queue_size=8)
        sched.add_model("m", slots=1)
        gate = asyncio.Event()
        order: list[int] = []
        t0 = asyncio.create_task(_hold(sched, order, 0, Priority.normal, gate))
        await asyncio.sleep(0)
        t1 = asyncio.create_task(_hold(sched, order, 1, Priority.normal, gate))
        await asyncio.sleep(0)
        assert len(sched.view()["m"]["waiting"]) == 1  # type: ignore[arg-type]
        t1.cancel()
        await asyncio.gather(t1, return_exceptions=True)
        assert sched.view()["m"]["waiting"] == []
        t0.cancel()  # a running request cancelled: its slot goes to the next one at once
        await asyncio.gather(t0, return_exceptions=True)
        t2 = asyncio.create_task(_hold(sched, order, 2, Priority.normal, gate))
        await asyncio.sleep(0)
        assert order == [0, 2]
        gate.set()
        await t2

    asyncio.run(main())


def test_close_turns_away_waiting_and_new_requests() -> None:
    async def main() -> None:
        sched = Scheduler(queue_size=8)
        sched.add_model("m", slots=1)
        gate = asyncio.Event()
        order: list[int] = []
        t0 = asyncio.create_task(_hold(sched, order, 0, Priority.normal, gate))
        await asyncio.sleep(0)
        t1 = asyncio.create_task(_hold(sched, order, 1, Priority.normal, gate))
        await asyncio.sleep(0)
        sched.close()
        with pytest.raises(ShuttingDown):
            await t1
        with pytest.raises(ShuttingDown):
            await _hold(sched, order, 2, Priority.normal, gate)
        gate.set()
        await t0
        assert order == [0]

    asyncio.run(main())


def test_waiter_cancelled_just_before_a_release_is_skipped() -> None:
    async def main() -> list[int]:
        sched = Scheduler(queue_size=8)
        sched.add_model("m", slots=1)
        order: list[int] = []
        gate = asyncio.Event()
        running = asyncio.create_task(_hold(sched, order, 0, Priority.normal, gate))
        await asyncio.sleep(0)
        doomed = asyncio.create_task(_hold(sched, order, 1, Priority.normal, gate))
        nxt = asyncio.create_task(_hold(sched, order, 2, Priority.normal, gate))
        await asyncio.sleep(0)
        # Cancel the first waiter and release the slot before its task gets to run.
        doomed.cancel()
        gate.set()
        await running
        await asyncio.gather(doomed, return_exceptions=True)
        await nxt
        view = sched.view()["m"]
        assert view["running"] == [] and view["waiting"] == []
        return order

    assert asyncio.run(main()) == [0, 2]


def test_eviction_ignores_a_waiter_cancelled_a_moment_ago() -> None:
    async def main() -> None:
        sched = Scheduler(queue_size=1)
        sched.add_model("m", slots=1)
        gate = asyncio.Event()
        order: list[int] = []
        running = asyncio.create_task(_hold(sched, order, 0, Priority.normal, gate))
        await asyncio.sleep(0)
        doomed = asyncio.create_task(_hold(sched, order, 1, Priority.batch, gate))
        await asyncio.sleep(0)
        doomed.cancel()  # still listed as waiting until its task runs
        with pytest.raises(Busy):  # the queue holds one (cancelled) waiter: no crash
            await _hold(sched, order, 2, Priority.interactive, gate)
        gate.set()
        await running
        await asyncio.gather(doomed, return_exceptions=True)

    asyncio.run(main())

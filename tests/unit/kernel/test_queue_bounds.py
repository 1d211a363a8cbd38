"""Queue places are shared fairly between users (issue 9, finding 6)."""

from __future__ import annotations

import asyncio

from aiosd.errors import Busy
from aiosd.kernel.scheduler import Priority, Scheduler

A, B, C = 1001, 1002, 1003


async def _wait(sched: Scheduler, uid: int, prio: Priority, gate: asyncio.Event) -> str:
    try:
        async with sched.slot("m", uid=uid, pid=uid, priority=prio):
            await gate.wait()
    except Busy as exc:
        return str(exc.data.get("scope"))
    return "served"


def test_a_flooding_user_cannot_evict_others_and_is_capped_by_name() -> None:
    async def main() -> dict[str, list[str]]:
        sched = Scheduler(queue_size=4, max_queued_per_user=3)
        sched.add_model("m", slots=1)
        gate = asyncio.Event()
        holder = asyncio.create_task(_wait(sched, C, Priority.batch, gate))
        await asyncio.sleep(0)
        # B waits first, at the lowest class; A then floods at interactive.
        b = [asyncio.create_task(_wait(sched, B, Priority.batch, gate))]
        await asyncio.sleep(0)
        a = [asyncio.create_task(_wait(sched, A, Priority.interactive, gate)) for _ in range(5)]
        await asyncio.sleep(0)
        # C, holding no waiting place, still finds room: at the expense of A, who holds most.
        c = [asyncio.create_task(_wait(sched, C, Priority.batch, gate))]
        await asyncio.sleep(0)
        gate.set()
        return {
            "a": list(await asyncio.gather(*a)),
            "b": list(await asyncio.gather(*b)),
            "c": [*await asyncio.gather(*c), await holder],
        }

    got = asyncio.run(main())
    assert got["b"] == ["served"]  # never evicted by A's better class
    # A had 3 places (its cap; the next two refused by name), one of which went to C.
    assert got["a"].count("user") == 2 and got["a"].count("model") == 1
    assert got["a"].count("served") == 2
    assert got["c"] == ["served", "served"]


def test_equal_holders_keep_their_places_and_the_newcomer_is_refused() -> None:
    async def main() -> list[str]:
        sched = Scheduler(queue_size=2)
        sched.add_model("m", slots=1)
        gate = asyncio.Event()
        tasks = [asyncio.create_task(_wait(sched, C, Priority.batch, gate))]
        await asyncio.sleep(0)
        for uid, prio in ((A, Priority.batch), (B, Priority.batch), (C, Priority.interactive)):
            tasks.append(asyncio.create_task(_wait(sched, uid, prio, gate)))
            await asyncio.sleep(0)
        gate.set()
        return list(await asyncio.gather(*tasks))

    # A and B hold one place each: C's interactive request is not worth one of theirs.
    assert asyncio.run(main()) == ["served", "served", "served", "model"]

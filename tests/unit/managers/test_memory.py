"""The memory manager on a real StorageManager (real SQLite in a tmp dir): LRU-K, budgets,
eviction to storage and back, pinning, sessions, isolation between users, and users' calls
running side by side."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from aiosd.config import MemoryConfig
from aiosd.errors import NotFound, QuotaExceeded
from aiosd.managers.memory import (
    CONTENDED_RETRIES,
    MemoryManager,
    _Call,
    _UserLock,
    entry_cost,
    space_cost,
)
from aiosd.managers.storage import Limits, StorageManager, UserStore

UID = 1001
OTHER = 1002
THIRD = 1003
FOURTH = 1004

#: Seconds: only a guard against a hung test; a passing test never waits this long.
GUARD = 30.0

T = TypeVar("T")

#: What a space named ``s`` costs in RAM besides its entries.
S = space_cost("s")


def cost(size: int, *tags: str) -> int:
    """What an entry of ``size`` bytes of content (and these tags) costs in RAM."""
    return entry_cost(size, [t.encode() for t in tags])


def run(tmp_path: Path, fn: Callable[[MemoryManager], Awaitable[None]], **cfg: Any) -> None:
    """Run ``fn(manager)`` on one event loop, with a fresh storage under ``tmp_path``."""

    async def main() -> None:
        storage = StorageManager(tmp_path / "storage", "normal", Limits(1 << 30, 1 << 20, 4))
        try:
            await fn(MemoryManager(storage, MemoryConfig(**cfg)))
        finally:
            await storage.close()

    asyncio.run(main())


class GatedStorage(StorageManager):
    """A real storage whose calls for the uids in ``gated`` stop in their worker thread, as a
    slow disk or a long query would, until the test sets ``opened`` (or the uid's own gate
    in ``gates``)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, "normal", Limits(1 << 30, 1 << 20, 4))
        self.gated: set[int] = set()
        #: Set (on the loop) when a gated call has reached its worker thread.
        self.inside = asyncio.Event()
        self.opened = threading.Event()
        self.gates: dict[int, threading.Event] = {}
        #: How many of the next gated calls fail, as a full storage quota would, once opened.
        self.refuse = 0
        self._refusing = threading.Lock()  # worker threads count ``refuse`` down

    async def run(self, uid: int, fn: Callable[[UserStore], T]) -> T:
        if uid not in self.gated:
            return await super().run(uid, fn)
        loop = asyncio.get_running_loop()

        def gated(s: UserStore) -> T:
            loop.call_soon_threadsafe(self.inside.set)
            if not self.gates.get(uid, self.opened).wait(GUARD):
                raise TimeoutError("the test never let the gated storage call go on")
            with self._refusing:
                if self.refuse > 0:
                    self.refuse -= 1
                    raise QuotaExceeded("storage quota full (the test said so)")
            return fn(s)

        return await super().run(uid, gated)


class WatchedMemory(MemoryManager):
    """A memory manager that tells when a call starts waiting for a user's lock."""

    def __init__(self, storage: StorageManager, cfg: MemoryConfig) -> None:
        super().__init__(storage, cfg)
        #: Set when a call finds a uid's lock taken and waits for it.
        self.queued: collections.defaultdict[int, asyncio.Event] = collections.defaultdict(
            asyncio.Event
        )

    async def _lock(self, uid: int) -> None:
        if not self._free(uid):
            self.queued[uid].set()
        await super()._lock(uid)


async def waits_for_lock(m: WatchedMemory, uid: int, call: asyncio.Task[Any]) -> None:
    """Until ``call`` waits for ``uid``'s lock, or ends (the test's asserts then tell)."""
    queued = asyncio.create_task(m.queued[uid].wait())
    await asyncio.wait([call, queued], timeout=GUARD, return_when=asyncio.FIRST_COMPLETED)
    queued.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await queued
    m.queued[uid].clear()


def run_gated(
    tmp_path: Path, fn: Callable[[WatchedMemory, GatedStorage], Awaitable[None]], **cfg: Any
) -> None:
    """:func:`run` on a :class:`GatedStorage`; the gate opens at the end whatever happens."""

    async def main() -> None:
        storage = GatedStorage(tmp_path / "storage")
        try:
            await fn(WatchedMemory(storage, MemoryConfig(**cfg)), storage)
        finally:
            storage.opened.set()
            for gate in storage.gates.values():
                gate.set()
            await storage.close()

    asyncio.run(main())


async def stored_keys(m: MemoryManager, uid: int, space: str) -> set[str]:
    """The keys of a space's evicted entries in the owner's storage."""
    if not m.storage.exists(uid):
        return set()
    page = await m.storage.run(uid, lambda s: s.list_keys(f"_memory.{space}", "", 1000, None))
    return {e["key"] for e in page["entries"]}


async def ram_ids(m: MemoryManager, uid: int, space: str) -> list[int]:
    return [e["id"] for e in await m.entries(uid, space)]


# --- LRU-K ------------------------------------------------------------------------------------


def test_lru_2_victims_for_a_known_trace(tmp_path: Path) -> None:
    # max 3 entries per space, K = 2.  Logical clock in brackets; each entry's history is
    # its last two access times.
    #   t1 add A(1)  A=[1]          t5 add C(3)  C=[5]
    #   t2 add B(2)  B=[2]          t6 get B     B=[4,6]
    #   t3 get A     A=[1,3]        t7 get C     C=[5,7]
    #   t4 get B     B=[2,4]        t8 get A     A=[3,8]
    #   t9 add D(4): 4 > 3.  2nd-last accesses A=3, B=4, C=5 -> victim A (1).
    #                (plain LRU would take B: last access 6 is the oldest.)
    #   t10 add E(5): B=[4,6] C=[5,7] D=[9] -> D has < K accesses: infinite distance -> D (4).
    #                (plain LRU would take B again.)
    #   t11 get B    B=[6,11]
    #   t12 add F(6): B=[6,11] C=[5,7] E=[10] -> E (5).
    #   t13, t14 get F twice   F=[13,14]
    #   t15 add G(7): B=[6,11] C=[5,7] F=[13,14] -> C (3).
    #   left in RAM: B(2), F(6), G(7).
    async def fn(m: MemoryManager) -> None:
        s = "trace"
        assert (await m.add(UID, s, "A", [], False))["evicted"] == []
        assert (await m.add(UID, s, "B", [], False))["evicted"] == []
        await m.get(UID, s, 1)
        await m.get(UID, s, 2)
        assert (await m.add(UID, s, "C", [], False))["evicted"] == []
        await m.get(UID, s, 2)
        await m.get(UID, s, 3)
        await m.get(UID, s, 1)
        d = await m.add(UID, s, "D", [], False)
        assert d["id"] == 4 and d["evicted"] == [1]
        assert (await m.add(UID, s, "E", [], False))["evicted"] == [4]
        await m.get(UID, s, 2)
        assert (await m.add(UID, s, "F", [], False))["evicted"] == [5]
        await m.get(UID, s, 6)
        await m.get(UID, s, 6)
        assert (await m.add(UID, s, "G", [], False))["evicted"] == [3]
        assert await ram_ids(m, UID, s) == [2, 6, 7]
        assert await stored_keys(m, UID, s) == {"1", "3", "4", "5"}

    run(tmp_path, fn, lru_k=2, max_entries_per_space=3)


def test_plain_lru_on_the_same_trace_picks_differently(tmp_path: Path) -> None:
    # The first nine steps of the trace above with K = 1 (plain LRU): at t9 the last
    # accesses are A=8, B=6, C=7, so B (2) goes — where LRU-2 took A (1).
    async def fn(m: MemoryManager) -> None:
        s = "trace"
        await m.add(UID, s, "A", [], False)
        await m.add(UID, s, "B", [], False)
        await m.get(UID, s, 1)
        await m.get(UID, s, 2)
        await m.add(UID, s, "C", [], False)
        await m.get(UID, s, 2)
        await m.get(UID, s, 3)
        await m.get(UID, s, 1)
        assert (await m.add(UID, s, "D", [], False))["evicted"] == [2]

    run(tmp_path, fn, lru_k=1, max_entries_per_space=3)


def test_entries_short_of_k_accesses_go_first_least_recent_first(tmp_path: Path) -> None:
    #   t1 add P1  t2 add P2  t3 add P3  t4 get P1 -> P1=[1,4] P2=[2] P3=[3]
    #   t5 add P4: P2 and P3 have infinite distance; P2's last access is older -> P2.
    #   t6 add P5: P1=[1,4] P3=[3] P4=[5] -> P3 (infinite, last access 3 < 5).
    #   t7 add P6: P1=[1,4] P4=[5] P5=[6] -> P4.
    async def fn(m: MemoryManager) -> None:
        for n in (1, 2, 3):
            await m.add(UID, "s", f"P{n}", [], False)
        await m.get(UID, "s", 1)
        assert (await m.add(UID, "s", "P4", [], False))["evicted"] == [2]
        assert (await m.add(UID, "s", "P5", [], False))["evicted"] == [3]
        assert (await m.add(UID, "s", "P6", [], False))["evicted"] == [4]
        assert await ram_ids(m, UID, "s") == [1, 5, 6]

    run(tmp_path, fn, lru_k=2, max_entries_per_space=3)


def test_byte_budget_of_a_space_evicts_as_many_as_needed(tmp_path: Path) -> None:
    async def fn(m: MemoryManager) -> None:
        for _ in range(4):
            await m.add(UID, "s", "x" * 300, [], False)  # one too many at the 4th
        assert await ram_ids(m, UID, "s") == [2, 3, 4]
        out = await m.add(UID, "s", "y" * 700, [], False)  # two must go
        assert out["evicted"] == [2, 3]
        assert (await m.stats())["bytes"] == cost(300) + cost(700) + S

    run(tmp_path, fn, max_bytes_per_space=3 * cost(300))


# --- eviction to storage and back -------------------------------------------------------------


def test_evicted_entry_is_searched_and_reloaded_by_get(tmp_path: Path) -> None:
    async def fn(m: MemoryManager) -> None:
        await m.add(UID, "s", "the Quick brown fox", ["animal"], False)
        await m.add(UID, "s", "lazy dog", [], False)
        await m.get(UID, "s", 2)
        out = await m.add(UID, "s", "another quick note", [], False)
        assert out["evicted"] == [1]
        assert await stored_keys(m, UID, "s") == {"1"}

        hits = await m.search(UID, "s", "quick", 10)
        assert {h["id"]: h["evicted"] for h in hits} == {1: True, 3: False}
        (fox,) = await m.search(UID, "s", "QUICK animal", 10)
        assert fox["id"] == 1 and fox["evicted"] and fox["content"] == "the Quick brown fox"
        assert await m.search(UID, "s", "quick cat", 10) == []

        got = await m.get(UID, "s", 1)  # reload: RAM is full again, so 2 or 3 must go
        assert got["content"] == "the Quick brown fox" and got["tags"] == ["animal"]
        assert got["evicted"] == [3]  # 3 has one access; 2 has two
        assert await ram_ids(m, UID, "s") == [1, 2]
        assert await stored_keys(m, UID, "s") == {"3"}
        hits = await m.search(UID, "s", "quick", 10)
        assert {h["id"]: h["evicted"] for h in hits} == {1: False, 3: True}

    run(tmp_path, fn, max_entries_per_space=2)


def test_update_of_evicted_entry_brings_it_back(tmp_path: Path) -> None:
    async def fn(m: MemoryManager) -> None:
        await m.add(UID, "s", "one", ["t"], True)
        await m.add(UID, "s", "two", [], False)
        await m.evict(UID, "s", [1, 2])
        assert await ram_ids(m, UID, "s") == []
        out = await m.update(UID, "s", 1, content="uno")
        assert out["content"] == "uno" and out["tags"] == ["t"] and out["pinned"] is True
        assert await ram_ids(m, UID, "s") == [1]
        assert await stored_keys(m, UID, "s") == {"2"}
        # ids go on after every entry, evicted ones included
        assert (await m.add(UID, "s", "three", [], False))["id"] == 3

    run(tmp_path, fn)


def test_delete_and_clear_reach_evicted_entries(tmp_path: Path) -> None:
    async def fn(m: MemoryManager) -> None:
        for n in range(4):
            await m.add(UID, "s", f"e{n}", [], n % 2 == 0)  # 1, 3 pinned
        await m.evict(UID, "s", [3, 4])
        await m.delete(UID, "s", 4)
        assert await stored_keys(m, UID, "s") == {"3"}
        with pytest.raises(NotFound):
            await m.delete(UID, "s", 4)
        assert await m.clear(UID, "s", True) == 1  # entry 2; pinned 1 and 3 stay
        assert await ram_ids(m, UID, "s") == [1]
        assert await stored_keys(m, UID, "s") == {"3"}
        assert await m.clear(UID, "s", False) == 2
        assert await ram_ids(m, UID, "s") == [] and await stored_keys(m, UID, "s") == set()

    run(tmp_path, fn)


def test_search_score_counts_words_and_weighs_recency(tmp_path: Path) -> None:
    async def fn(m: MemoryManager) -> None:
        await m.add(UID, "s", "apple apple", [], False)  # 2 occurrences, old
        await m.add(UID, "s", "apple pie", ["Apple"], False)  # 2 occurrences (tag), newer
        await m.add(UID, "s", "pear", [], False)
        hits = await m.search(UID, "s", "APPLE", 10)
        assert [h["id"] for h in hits] == [2, 1]
        assert hits[0]["score"] > hits[1]["score"]
        for _ in range(60):  # entry 1 is now far more recent than entry 2
            await m.get(UID, "s", 1)
        assert [h["id"] for h in await m.search(UID, "s", "apple", 10)] == [1, 2]
        assert [h["id"] for h in await m.search(UID, "s", "apple", 1)] == [1]
        before = await m.search(UID, "s", "apple", 10)
        assert await m.search(UID, "s", "apple", 10) == before  # searching is no access

    run(tmp_path, fn)


# --- pinning and refusals ---------------------------------------------------------------------


def test_pinned_entries_are_never_evicted(tmp_path: Path) -> None:
    async def fn(m: MemoryManager) -> None:
        await m.add(UID, "s", "pinned old", [], True)  # oldest, one access: LRU-K's first pick
        await m.add(UID, "s", "pinned too", [], True)
        for n in range(10):
            out = await m.add(UID, "s", f"loose {n}", [], False)
            assert 1 not in out["evicted"] and 2 not in out["evicted"]
        assert await ram_ids(m, UID, "s") == [1, 2, 12]
        assert await stored_keys(m, UID, "s") == {str(i) for i in range(3, 12)}
        # unpinning makes an entry evictable again
        await m.update(UID, "s", 1, pinned=False)
        assert (await m.add(UID, "s", "more", [], False))["evicted"] == [12]
        assert (await m.add(UID, "s", "more", [], False))["evicted"] == [13]

    run(tmp_path, fn, max_entries_per_space=3)


def test_refused_when_only_pinned_entries_remain_and_nothing_changes(tmp_path: Path) -> None:
    async def fn(m: MemoryManager) -> None:
        await m.add(UID, "s", "a" * 500, ["x"], True)
        await m.add(UID, "s", "b" * 400, [], True)
        entries, stats = await m.entries(UID, "s"), await m.stats()

        with pytest.raises(QuotaExceeded, match="max_bytes_per_space") as exc:
            await m.add(UID, "s", "c" * 200, [], False)
        assert exc.value.data["limit"] == "memory.max_bytes_per_space"
        with pytest.raises(QuotaExceeded, match="max_bytes_per_space"):
            await m.update(UID, "s", 2, content="b" * 1200, tags=["y"], pinned=False)
        assert await m.entries(UID, "s") == entries and await m.stats() == stats
        assert await stored_keys(m, UID, "s") == set()

        assert (await m.add(UID, "s", "c", [], True))["id"] == 3  # the refused add took no id
        entries, stats = await m.entries(UID, "s"), await m.stats()
        with pytest.raises(QuotaExceeded, match="max_entries_per_space"):
            await m.add(UID, "s", "d", [], False)
        assert await m.entries(UID, "s") == entries and await m.stats() == stats
        assert await stored_keys(m, UID, "s") == set()

    room = cost(500, "x") + cost(400) + cost(1) + 100  # a 200-byte entry is too many
    run(tmp_path, fn, max_entries_per_space=3, max_bytes_per_space=room)


def test_refusal_evicts_nothing_even_when_some_entries_are_unpinned(tmp_path: Path) -> None:
    # An unpinned 300-byte entry cannot make room for a pinned 1500-byte one next to a
    # pinned 500-byte one (only for a 200-byte one): refused before anything moves.
    async def fn(m: MemoryManager) -> None:
        await m.add(UID, "s", "a" * 500, [], True)
        await m.add(UID, "s", "b" * 300, [], False)
        with pytest.raises(QuotaExceeded):
            await m.add(UID, "s", "c" * 1500, [], True)
        assert await ram_ids(m, UID, "s") == [1, 2]
        assert await stored_keys(m, UID, "s") == set()

    run(tmp_path, fn, max_bytes_per_space=cost(500) + cost(300) + cost(200))


# --- the daemon-wide budget -------------------------------------------------------------------


def test_daemon_budget_evicts_from_another_space(tmp_path: Path) -> None:
    async def fn(m: MemoryManager) -> None:
        await m.add(UID, "a", "a" * 400, [], False)  # t1
        await m.add(UID, "b", "b" * 400, [], False)  # t2
        await m.get(UID, "b", 1)  # t3: b1 has two accesses, a1 one
        out = await m.add(UID, "b", "c" * 400, [], False)  # one entry too many
        assert out["evicted"] == []  # nothing of space b went
        assert await ram_ids(m, UID, "a") == [] and await stored_keys(m, UID, "a") == {"1"}
        assert await ram_ids(m, UID, "b") == [1, 2]
        assert (await m.stats())["bytes"] == 2 * cost(400) + 2 * space_cost("a")
        assert [h["evicted"] for h in await m.search(UID, "a", "a" * 400, 5)] == [True]

    budget = 2 * cost(400) + 2 * space_cost("a") + 100
    run(tmp_path, fn, budget_bytes=budget, max_bytes_per_space=1 << 20)


def test_daemon_budget_spares_pinned_entries_and_refuses_when_only_they_are_left(
    tmp_path: Path,
) -> None:
    async def fn(m: MemoryManager) -> None:
        await m.add(UID, "a", "p" * 600, [], True)  # oldest, one access — but pinned
        await m.add(UID, "b", "x" * 300, [], False)
        assert (await m.add(UID, "b", "y" * 300, [], False))["evicted"] == [1]
        assert await ram_ids(m, UID, "a") == [1] and await ram_ids(m, UID, "b") == [2]
        stats = await m.stats()
        # Even with b's 300 evicted, a's pinned 600 leave no room for 500 -> refused, no
        # eviction, and the space c made for it is gone again.
        with pytest.raises(QuotaExceeded, match="budget_bytes"):
            await m.add(UID, "c", "q" * 500, [], False)
        assert await m.stats() == stats and await ram_ids(m, UID, "b") == [2]
        assert await stored_keys(m, UID, "b") == {"1"}

    budget = cost(600) + cost(300) + 2 * space_cost("a") + 100
    run(tmp_path, fn, budget_bytes=budget, max_bytes_per_space=1 << 20)


def test_daemon_budget_evicts_another_users_entry_to_that_users_storage(tmp_path: Path) -> None:
    async def fn(m: MemoryManager) -> None:
        await m.add(UID, "s", "mine " * 80, [], False)
        out = await m.add(OTHER, "s", "theirs " * 100, [], False)
        assert out["evicted"] == []  # the other user learns nothing of it
        assert await ram_ids(m, UID, "s") == []
        assert await stored_keys(m, UID, "s") == {"1"}
        assert await stored_keys(m, OTHER, "s") == set()
        assert [h["id"] for h in await m.search(UID, "s", "mine", 5)] == [1]
        assert await m.search(OTHER, "s", "mine", 5) == []

    budget = cost(400) + cost(700) + 2 * S - 1  # one byte short of both entries
    run(tmp_path, fn, budget_bytes=budget, max_bytes_per_space=1 << 20)


# --- sessions and users -----------------------------------------------------------------------


def test_drop_session_removes_unpinned_and_keeps_pinned_in_storage(tmp_path: Path) -> None:
    async def fn(m: MemoryManager) -> None:
        s = "socket-1"
        await m.add(UID, s, "scratch", [], False)  # 1
        await m.add(UID, s, "keep me", ["k"], True)  # 2
        await m.add(UID, s, "old scratch", [], False)  # 3, evicted
        await m.add(UID, s, "old keeper", [], True)  # 4, evicted
        await m.evict(UID, s, [3, 4])
        await m.drop_session(UID, s)

        assert await m.entries(UID, s) == []
        assert (await m.stats())["entries"] == 0
        assert await stored_keys(m, UID, s) == {"2", "4"}
        for gone in (1, 3):
            with pytest.raises(NotFound):
                await m.get(UID, s, gone)
        kept = await m.get(UID, s, 2)  # reachable later by naming the space
        assert kept["content"] == "keep me" and kept["pinned"] and kept["tags"] == ["k"]
        assert [h["id"] for h in await m.search(UID, s, "old", 5)] == [4]
        assert (await m.add(UID, s, "new", [], False))["id"] == 5
        await m.drop_session(UID, "never-used")  # harmless

    run(tmp_path, fn)


def test_users_never_see_each_others_entries(tmp_path: Path) -> None:
    async def fn(m: MemoryManager) -> None:
        await m.add(UID, "default", "secret plans", ["private"], False)
        await m.add(UID, "default", "evicted secret", [], False)
        await m.evict(UID, "default", [2])
        for id_ in (1, 2):
            with pytest.raises(NotFound):
                await m.get(OTHER, "default", id_)
            with pytest.raises(NotFound):
                await m.update(OTHER, "default", id_, content="mine now")
            with pytest.raises(NotFound):
                await m.delete(OTHER, "default", id_)
            with pytest.raises(NotFound):
                await m.evict(OTHER, "default", [id_])
        assert await m.search(OTHER, "default", "secret", 10) == []
        assert await m.entries(OTHER, "default") == []
        assert await m.clear(OTHER, "default", False) == 0
        await m.drop_session(OTHER, "default")
        # the other user's first entry gets its own id 1; the owner's data is untouched
        assert (await m.add(OTHER, "default", "hello", [], False))["id"] == 1
        assert (await m.get(UID, "default", 1))["content"] == "secret plans"
        assert (await m.get(UID, "default", 2))["content"] == "evicted secret"
        assert await m.get(OTHER, "default", 1) != await m.get(UID, "default", 1)

    run(tmp_path, fn)


# --- users side by side -----------------------------------------------------------------------


def test_a_user_stuck_in_storage_does_not_stall_another_users_memory(tmp_path: Path) -> None:
    async def fn(m: MemoryManager, st: GatedStorage) -> None:
        for uid in (UID, OTHER):  # both have a store, so a new space asks it for its ids
            await st.run(uid, lambda s: None)
        st.gated.add(UID)
        stuck = asyncio.create_task(m.add(UID, "s", "mine", [], False))
        await asyncio.wait_for(st.inside.wait(), GUARD)  # it holds UID's lock, in UID's store

        out = await asyncio.wait_for(m.add(OTHER, "s", "theirs", [], False), GUARD)
        assert out["id"] == 1 and out["evicted"] == []
        assert (await asyncio.wait_for(m.get(OTHER, "s", 1), GUARD))["content"] == "theirs"
        hits = await asyncio.wait_for(m.search(OTHER, "s", "theirs", 5), GUARD)
        assert [h["id"] for h in hits] == [1]
        assert not stuck.done()

        st.opened.set()
        assert (await asyncio.wait_for(stuck, GUARD))["content"] == "mine"
        assert await ram_ids(m, UID, "s") == [1] and await ram_ids(m, OTHER, "s") == [1]
        assert m._locks == {}  # a lock nobody holds or waits for is not kept

    run_gated(tmp_path, fn)


@pytest.mark.parametrize(
    ("writer", "owner"), [(UID, OTHER), (OTHER, UID)], ids=["writer-uid-below", "writer-uid-above"]
)
def test_a_user_who_keeps_calls_under_way_cannot_keep_its_entries_in_ram(
    tmp_path: Path, writer: int, owner: int
) -> None:
    # Only the owner's entry can make room for the write.  The owner has a call in its store
    # and then another queued: the write waits for its turn, is not refused, and evicts it.
    async def fn(m: WatchedMemory, st: GatedStorage) -> None:
        await st.run(owner, lambda s: None)
        await m.add(owner, "s", "o" * 800, [], False)
        st.gated.add(owner)
        first = asyncio.create_task(m.search(owner, "s", "o" * 800, 5))
        await asyncio.wait_for(st.inside.wait(), GUARD)  # it holds the owner's lock

        write = asyncio.create_task(m.add(writer, "s", "w" * 400, [], False))  # too many
        await waits_for_lock(m, owner, write)
        assert not write.done()
        later = asyncio.create_task(m.entries(owner, "s"))
        await waits_for_lock(m, owner, later)
        assert not write.done() and not later.done()

        st.opened.set()
        out = await asyncio.wait_for(write, GUARD)
        assert out["id"] == 1 and out["evicted"] == []
        assert await asyncio.wait_for(later, GUARD) == []  # its turn came after the write's
        assert [h["evicted"] for h in await asyncio.wait_for(first, GUARD)] == [False]
        bytes_left = cost(400) + 2 * S  # the owner's space stays, with no entry in RAM
        assert (
            await stored_keys(m, owner, "s") == {"1"} and (await m.stats())["bytes"] == bytes_left
        )
        assert m._locks == {}

    run_gated(
        tmp_path, fn, budget_bytes=cost(800) + cost(400) + 2 * S - 1, max_bytes_per_space=1 << 20
    )


def test_two_writes_that_need_each_others_entries_both_get_room(tmp_path: Path) -> None:
    # Each write needs both old entries out, its own user's and the other's, while the other
    # write holds that user's lock: neither is refused and neither waits forever.
    spaces = 2 * space_cost("old") + 2 * space_cost("new")

    async def fn(m: WatchedMemory, st: GatedStorage) -> None:
        for uid in (UID, OTHER):
            await st.run(uid, lambda s: None)  # a new space then asks the store for its ids
            await m.add(uid, "old", "x" * 300, [], False)
        st.gated.add(UID)
        mine = asyncio.create_task(m.add(UID, "new", "u" * 775, [], False))
        await asyncio.wait_for(st.inside.wait(), GUARD)  # it holds UID's lock
        st.inside.clear()
        st.gated.add(OTHER)
        theirs = asyncio.create_task(m.add(OTHER, "new", "o" * 775, [], False))
        await asyncio.wait_for(st.inside.wait(), GUARD)  # it holds OTHER's lock

        st.opened.set()
        done = await asyncio.wait_for(asyncio.gather(mine, theirs), GUARD)
        assert [out["id"] for out in done] == [1, 1]
        assert (await m.stats())["bytes"] == cost(775) + spaces  # one of the new went too
        assert await stored_keys(m, UID, "old") == {"1"} == await stored_keys(m, OTHER, "old")
        assert m._locks == {}

    run_gated(tmp_path, fn, budget_bytes=cost(775) + spaces + 100, max_bytes_per_space=1 << 20)


def test_a_write_that_gives_up_waiting_for_another_users_lock_holds_no_lock(
    tmp_path: Path,
) -> None:
    async def fn(m: WatchedMemory, st: GatedStorage) -> None:
        await st.run(OTHER, lambda s: None)
        await m.add(OTHER, "s", "o" * 800, [], False)
        st.gated.add(OTHER)
        busy = asyncio.create_task(m.search(OTHER, "s", "o" * 800, 5))
        await asyncio.wait_for(st.inside.wait(), GUARD)
        write = asyncio.create_task(m.add(UID, "s", "u" * 400, [], False))
        await waits_for_lock(m, OTHER, write)
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write

        assert await asyncio.wait_for(m.entries(UID, "s"), GUARD) == []  # UID's lock is free
        assert (await m.stats())["bytes"] == cost(800) + S  # UID's space went with its entry
        st.opened.set()
        await asyncio.wait_for(busy, GUARD)
        assert await ram_ids(m, OTHER, "s") == [1] and m._locks == {}

    run_gated(
        tmp_path, fn, budget_bytes=cost(800) + cost(400) + 2 * S - 1, max_bytes_per_space=1 << 20
    )


def test_evicting_another_users_entry_holds_that_users_lock(tmp_path: Path) -> None:
    async def fn(m: MemoryManager, st: GatedStorage) -> None:
        await m.add(OTHER, "s", "o" * 600, [], False)
        st.gated.add(OTHER)
        writer = asyncio.create_task(m.add(UID, "s", "u" * 600, [], False))
        await asyncio.wait_for(st.inside.wait(), GUARD)  # moving OTHER's entry to its store
        reader = asyncio.create_task(m.entries(OTHER, "s"))
        await asyncio.sleep(0)  # one turn of the loop: the reader is now queued for the lock
        assert not reader.done()

        st.opened.set()
        assert (await asyncio.wait_for(writer, GUARD))["evicted"] == []
        assert await asyncio.wait_for(reader, GUARD) == []  # never the entry half moved
        assert await stored_keys(m, OTHER, "s") == {"1"}
        assert m._locks == {}

    run_gated(tmp_path, fn, budget_bytes=cost(600) * 2 + 2 * S - 1, max_bytes_per_space=1 << 20)


def test_each_owners_lock_is_held_only_while_its_own_victims_move(tmp_path: Path) -> None:
    # LRU-K order interleaves the owners: OTHER's 1, THIRD's 1, OTHER's 2.  OTHER's victims
    # move first and its lock is let go at once: its calls need not wait for THIRD's store.
    async def fn(m: WatchedMemory, st: GatedStorage) -> None:
        await m.add(OTHER, "s", "bee " * 50, [], False)  # t1
        await m.add(THIRD, "s", "c" * 200, [], False)  # t2
        await m.add(OTHER, "s", "bee " * 50, [], False)  # t3
        await m.add(THIRD, "s", "c" * 200, [], False)  # t4
        st.gated.add(THIRD)
        write = asyncio.create_task(m.add(UID, "s", "u" * 800, [], False))  # 3 must go
        await asyncio.wait_for(st.inside.wait(), GUARD)  # THIRD's entry is on its way out

        assert await asyncio.wait_for(m.entries(OTHER, "s"), GUARD) == []
        hits = await asyncio.wait_for(m.search(OTHER, "s", "bee", 5), GUARD)
        assert [(h["id"], h["evicted"]) for h in hits] == [(2, True), (1, True)]
        assert not write.done()

        st.opened.set()
        assert (await asyncio.wait_for(write, GUARD))["evicted"] == []
        assert await ram_ids(m, THIRD, "s") == [2] and await stored_keys(m, THIRD, "s") == {"1"}
        assert (await m.stats())["bytes"] == cost(800) + cost(200) + 3 * S
        assert m._locks == {}

    run_gated(
        tmp_path,
        fn,
        budget_bytes=cost(800) + 2 * cost(200) + 3 * S - 1,  # two victims are not enough
        max_bytes_per_space=1 << 20,
    )


def test_an_owner_whose_call_began_while_earlier_victims_moved_is_waited_for(
    tmp_path: Path,
) -> None:
    # The write plans OTHER's entry, then THIRD's.  While OTHER's moves, THIRD's search
    # begins: THIRD's entry may move only once that search is over, never under it.
    async def fn(m: WatchedMemory, st: GatedStorage) -> None:
        await m.add(OTHER, "s", "o" * 400, [], False)  # t1
        await m.add(THIRD, "s", "third " * 50, [], False)  # t2
        await st.run(THIRD, lambda s: None)
        st.gated |= {OTHER, THIRD}
        st.gates[THIRD] = threading.Event()
        write = asyncio.create_task(m.add(UID, "s", "u" * 1000, [], False))  # both go
        await asyncio.wait_for(st.inside.wait(), GUARD)  # OTHER's entry is on its way out
        st.inside.clear()
        search = asyncio.create_task(m.search(THIRD, "s", "third", 5))
        await asyncio.wait_for(st.inside.wait(), GUARD)  # in THIRD's store, holding its lock

        st.opened.set()
        await waits_for_lock(m, THIRD, write)
        assert not write.done() and await stored_keys(m, OTHER, "s") == {"1"}
        st.gates[THIRD].set()
        hits = await asyncio.wait_for(search, GUARD)
        assert [(h["id"], h["evicted"]) for h in hits] == [(1, False)]
        assert (await asyncio.wait_for(write, GUARD))["evicted"] == []
        assert await stored_keys(m, THIRD, "s") == {"1"}
        assert (await m.stats())["bytes"] == cost(1000) + 3 * S
        assert m._locks == {}

    run_gated(tmp_path, fn, budget_bytes=cost(1000) + 3 * S + 100, max_bytes_per_space=1 << 20)


def test_a_victim_used_while_earlier_victims_moved_is_planned_again(tmp_path: Path) -> None:
    # The write plans OTHER's entry, then THIRD's 1.  While OTHER's moves, THIRD reads its 1:
    # now its 2, with fewer than K accesses, is LRU-K's pick, and the 1 stays.
    async def fn(m: WatchedMemory, st: GatedStorage) -> None:
        await m.add(OTHER, "s", "o" * 400, [], False)  # t1
        await m.add(THIRD, "s", "c" * 300, [], False)  # t2
        await m.add(THIRD, "s", "d" * 300, [], False)  # t3
        st.gated.add(OTHER)
        write = asyncio.create_task(m.add(UID, "s", "u" * 700, [], False))  # 2 must go
        await asyncio.wait_for(st.inside.wait(), GUARD)  # OTHER's entry is on its way out
        await asyncio.wait_for(m.get(THIRD, "s", 1), GUARD)

        st.opened.set()
        assert (await asyncio.wait_for(write, GUARD))["evicted"] == []
        assert await ram_ids(m, THIRD, "s") == [1] and await stored_keys(m, THIRD, "s") == {"2"}
        assert (await m.stats())["bytes"] == cost(700) + cost(300) + 3 * S
        assert m._locks == {}

    run_gated(
        tmp_path, fn, budget_bytes=cost(700) + cost(300) + 3 * S + 100, max_bytes_per_space=1 << 20
    )


def test_a_second_write_waits_for_victims_on_their_way_out_instead_of_evicting_more(
    tmp_path: Path,
) -> None:
    # THIRD holds the most, above its fair share, and FOURTH less: THIRD's entry is the
    # victim of both writes, and evicting it is enough for both.
    final = 5 * S + 2 * cost(10) + cost(300) + cost(200)  # every space, and what stays

    async def fn(m: WatchedMemory, st: GatedStorage) -> None:
        await m.add(THIRD, "s", "v" * 3000, [], False)  # t1: the first victim
        await m.add(FOURTH, "s", "w" * 10, [], False)  # t2
        await m.add(FOURTH, "t", "w" * 10, [], False)  # t3
        st.gated.add(THIRD)
        first = asyncio.create_task(m.add(UID, "s", "u" * 300, [], False))  # over the budget
        await asyncio.wait_for(st.inside.wait(), GUARD)  # THIRD's entry is on its way out

        # THIRD's entry, still the best victim, must be out for this one too.
        second = asyncio.create_task(m.add(OTHER, "s", "x" * 200, [], False))
        await waits_for_lock(m, THIRD, second)
        assert not second.done()

        st.opened.set()
        assert (await asyncio.wait_for(second, GUARD))["evicted"] == []
        await asyncio.wait_for(first, GUARD)
        assert await ram_ids(m, FOURTH, "s") == [1] and await ram_ids(m, FOURTH, "t") == [1]
        assert await ram_ids(m, THIRD, "s") == [] and (await m.stats())["bytes"] == final

    budget = final + cost(3000) // 2
    run_gated(tmp_path, fn, budget_bytes=budget, max_bytes_per_space=1 << 20)


def test_budgets_hold_after_the_writes_even_if_a_victim_fails_to_move(tmp_path: Path) -> None:
    # The second write would fit if the first's victim left; it does not (THIRD's storage
    # refuses it once).  The first write, with nothing else to evict, is refused; the second
    # evicts for itself: RAM ends within the budget.
    # Evicting THIRD's entry is enough for either write, evicting OTHER's is not.
    budget = 4 * S + cost(400) + cost(100) + cost(300) + 100

    async def fn(m: WatchedMemory, st: GatedStorage) -> None:
        await m.add(THIRD, "s", "v" * 1500, [], False)  # the only entry that can go
        await m.add(FOURTH, "s", "p" * 400, [], True)
        st.gated.add(THIRD)
        first = asyncio.create_task(m.add(UID, "s", "u" * 100, [], False))  # over the budget
        await asyncio.wait_for(st.inside.wait(), GUARD)  # THIRD's entry is on its way out
        second = asyncio.create_task(m.add(OTHER, "s", "x" * 300, [], False))
        await waits_for_lock(m, THIRD, second)

        st.refuse = 1
        st.opened.set()
        with pytest.raises(QuotaExceeded, match="could not be moved to their owners' storage"):
            await asyncio.wait_for(first, GUARD)
        assert (await asyncio.wait_for(second, GUARD))["id"] == 1
        assert (await m.stats())["bytes"] <= budget
        assert await ram_ids(m, OTHER, "s") == [1] and await ram_ids(m, UID, "s") == []
        assert await stored_keys(m, THIRD, "s") == {"1"} and m._locks == {}

    run_gated(tmp_path, fn, budget_bytes=budget, max_bytes_per_space=1 << 20)


def test_a_call_that_gives_up_waiting_passes_its_turn_on(tmp_path: Path) -> None:
    async def fn(m: MemoryManager, st: GatedStorage) -> None:
        await st.run(UID, lambda s: None)
        st.gated.add(UID)
        first = asyncio.create_task(m.add(UID, "a", "one", [], False))
        await asyncio.wait_for(st.inside.wait(), GUARD)
        second = asyncio.create_task(m.add(UID, "b", "two", [], False))
        third = asyncio.create_task(m.add(UID, "c", "three", [], False))
        await asyncio.sleep(0)  # one turn of the loop: both are queued for UID's lock
        second.cancel()

        st.opened.set()
        assert (await asyncio.wait_for(first, GUARD))["id"] == 1
        with pytest.raises(asyncio.CancelledError):
            await second
        assert (await asyncio.wait_for(third, GUARD))["content"] == "three"
        assert await m.entries(UID, "b") == [] and m._locks == {}

    run_gated(tmp_path, fn)


def test_user_lock_handed_over_to_a_caller_that_gives_up_goes_to_the_next() -> None:
    async def main() -> None:
        lock = _UserLock()
        assert lock.try_acquire()
        first = asyncio.create_task(lock.acquire())
        second = asyncio.create_task(lock.acquire())
        await asyncio.sleep(0)  # one turn of the loop: both wait
        lock.release()  # promised to the first, which has not run yet
        assert not lock.free and not lock.try_acquire()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(second, GUARD)
        assert not lock.free
        lock.release()
        assert lock.free and lock.try_acquire()

    asyncio.run(main())


def test_a_write_is_refused_only_once_the_same_users_keep_getting_in_its_way() -> None:
    call = _Call(UID)
    for uid in (OTHER, THIRD, FOURTH):  # each user's first time is free: there are few users
        call.contended({uid}, 2000, 1024)
    for _ in range(CONTENDED_RETRIES):
        call.contended({OTHER, THIRD}, 2000, 1024)
    with pytest.raises(QuotaExceeded, match="try again") as exc:
        call.contended({THIRD}, 2000, 1024)
    assert exc.value.data == {"limit": "memory.budget_bytes", "value": 1024, "needed": 2000}

"""The memory manager on a real StorageManager (real SQLite in a tmp dir): LRU-K, budgets,
eviction to storage and back, pinning, sessions, and isolation between users."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from aiosd.config import MemoryConfig
from aiosd.errors import NotFound, QuotaExceeded
from aiosd.managers.memory import MemoryManager
from aiosd.managers.storage import Limits, StorageManager

UID = 1001
OTHER = 1002


def run(tmp_path: Path, fn: Callable[[MemoryManager], Awaitable[None]], **cfg: Any) -> None:
    """Run ``fn(manager)`` on one event loop, with a fresh storage under ``tmp_path``."""

    async def main() -> None:
        storage = StorageManager(tmp_path / "storage", "normal", Limits(1 << 30, 1 << 20, 4))
        try:
            await fn(MemoryManager(storage, MemoryConfig(**cfg)))
        finally:
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
            await m.add(UID, "s", "x" * 300, [], False)  # 1200 bytes > 1024 at the 4th
        assert await ram_ids(m, UID, "s") == [2, 3, 4]
        out = await m.add(UID, "s", "y" * 700, [], False)  # 1600: two must go
        assert out["evicted"] == [2, 3]
        assert (await m.stats())["bytes"] == 1000

    run(tmp_path, fn, max_bytes_per_space=1024)


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
            await m.update(UID, "s", 2, content="b" * 600, tags=["y"], pinned=False)
        assert await m.entries(UID, "s") == entries and await m.stats() == stats
        assert await stored_keys(m, UID, "s") == set()

        assert (await m.add(UID, "s", "c", [], True))["id"] == 3  # the refused add took no id
        entries, stats = await m.entries(UID, "s"), await m.stats()
        with pytest.raises(QuotaExceeded, match="max_entries_per_space"):
            await m.add(UID, "s", "d", [], False)
        assert await m.entries(UID, "s") == entries and await m.stats() == stats
        assert await stored_keys(m, UID, "s") == set()

    run(tmp_path, fn, max_entries_per_space=3, max_bytes_per_space=1024)


def test_refusal_evicts_nothing_even_when_some_entries_are_unpinned(tmp_path: Path) -> None:
    # An unpinned 300-byte entry cannot make room for a pinned 900-byte one next to a
    # pinned 500-byte one: refused before anything moves to storage.
    async def fn(m: MemoryManager) -> None:
        await m.add(UID, "s", "a" * 500, [], True)
        await m.add(UID, "s", "b" * 300, [], False)
        with pytest.raises(QuotaExceeded):
            await m.add(UID, "s", "c" * 900, [], True)
        assert await ram_ids(m, UID, "s") == [1, 2]
        assert await stored_keys(m, UID, "s") == set()

    run(tmp_path, fn, max_bytes_per_space=1024)


# --- the daemon-wide budget -------------------------------------------------------------------


def test_daemon_budget_evicts_from_another_space(tmp_path: Path) -> None:
    async def fn(m: MemoryManager) -> None:
        await m.add(UID, "a", "a" * 400, [], False)  # t1
        await m.add(UID, "b", "b" * 400, [], False)  # t2
        await m.get(UID, "b", 1)  # t3: b1 has two accesses, a1 one
        out = await m.add(UID, "b", "c" * 400, [], False)  # 1200 > 1024
        assert out["evicted"] == []  # nothing of space b went
        assert await ram_ids(m, UID, "a") == [] and await stored_keys(m, UID, "a") == {"1"}
        assert await ram_ids(m, UID, "b") == [1, 2]
        assert (await m.stats())["bytes"] == 800
        assert [h["evicted"] for h in await m.search(UID, "a", "a" * 400, 5)] == [True]

    run(tmp_path, fn, budget_bytes=1024, max_bytes_per_space=1 << 20)


def test_daemon_budget_spares_pinned_entries_and_refuses_when_only_they_are_left(
    tmp_path: Path,
) -> None:
    async def fn(m: MemoryManager) -> None:
        await m.add(UID, "a", "p" * 600, [], True)  # oldest, one access — but pinned
        await m.add(UID, "b", "x" * 300, [], False)
        assert (await m.add(UID, "b", "y" * 300, [], False))["evicted"] == [1]
        assert await ram_ids(m, UID, "a") == [1] and await ram_ids(m, UID, "b") == [2]
        stats = await m.stats()
        # 600 + 300 + 500: even with b's 300 evicted it is 1100 > 1024 -> refused, no eviction
        with pytest.raises(QuotaExceeded, match="budget_bytes"):
            await m.add(UID, "c", "q" * 500, [], True)
        assert await m.stats() == stats and await ram_ids(m, UID, "b") == [2]
        assert await stored_keys(m, UID, "b") == {"1"}

    run(tmp_path, fn, budget_bytes=1024, max_bytes_per_space=1 << 20)


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

    run(tmp_path, fn, budget_bytes=1024, max_bytes_per_space=1 << 20)


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

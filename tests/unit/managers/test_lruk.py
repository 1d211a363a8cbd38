"""LRU-K planning alone (no storage, no event loop): which entries leave RAM, in which
order, whose first under the daemon budget, when no choice of them can do, and that planning
reads only as many candidates as it evicts."""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable, Iterator, Sequence

from aiosd.managers.lruk import (
    Candidate,
    Limits,
    Refusal,
    Usage,
    ordered,
    plan,
    rank,
    walk,
)

ROOMY = 1 << 40

#: The writer's uid in these tests; other owners are 2, 3, ...
WRITER = 1


def c(
    key: str, *accesses: int, size: int = 1, pinned: bool = False, owner: int = WRITER
) -> Candidate[str]:
    return Candidate(key, size, accesses, pinned, owner)


def limits(
    entries: int = ROOMY, space_bytes: int = ROOMY, budget: int = ROOMY, user: int = ROOMY
) -> Limits:
    return Limits(entries, space_bytes, user, budget)


def planned(
    space: Sequence[Candidate[str]],
    mine: Sequence[Candidate[str]] = (),
    others: Sequence[Candidate[str]] = (),
    *,
    k: int = 2,
    lim: Limits,
    keep: Iterable[str] = (),
) -> list[Candidate[str]] | Refusal:
    """Plan for a write to ``space``, with the writer's other spaces ``mine`` and other
    owners' entries ``others``, each source given in victim order as the manager gives it."""
    owners: dict[int, int] = {}
    for x in [*space, *mine, *others]:
        owners[x.owner] = owners.get(x.owner, 0) + x.size
    by_owner: dict[int, list[Candidate[str]]] = {}
    for x in others:
        by_owner.setdefault(x.owner, []).append(x)
    usage = Usage(
        WRITER,
        len(space),
        sum(x.size for x in space),
        owners.get(WRITER, 0),
        sum(owners.values()),
        owners,
    )
    return plan(
        usage,
        ordered(space, k),
        ordered([*space, *mine], k),
        {o: ordered(xs, k) for o, xs in by_owner.items()},
        k=k,
        limits=lim,
        keep=set(keep),
    )


def keys(out: list[Candidate[str]] | Refusal) -> list[str]:
    assert not isinstance(out, Refusal), out
    return [x.key for x in out]


def untouched() -> Iterator[Candidate[str]]:
    raise AssertionError("read although no budget was exceeded")
    yield  # pragma: no cover


def test_rank_is_the_kth_most_recent_access_then_the_last() -> None:
    assert rank((1, 3, 8), 2) == (3, 8)
    assert rank((1, 3, 8), 3) == (1, 8)
    assert rank((1, 3, 8), 1) == (8, 8)
    assert rank((9,), 2) == (-1, 9)  # fewer than K: infinite distance, sorts first
    assert rank((), 2) == (-1, -1)


def test_a_heap_is_walked_in_order_without_being_changed() -> None:
    rng = random.Random(7)
    items = [rng.randrange(1000) for _ in range(500)]
    heap = list(items)
    heapq.heapify(heap)
    before = list(heap)
    assert list(walk(heap)) == sorted(items)
    assert heap == before
    first = walk(heap)
    assert [next(first) for _ in range(3)] == sorted(items)[:3]
    assert list(walk([])) == []


def test_the_victim_has_the_oldest_kth_most_recent_access() -> None:
    # A's last access (8) is the newest, but its 2nd-last (3) is the oldest: LRU-2 takes A
    # where plain LRU takes B (last access 6).
    space = [c("A", 3, 8), c("B", 4, 6), c("C", 5, 7), c("D", 9)]
    lim = limits(entries=3)
    assert keys(planned(space, k=2, lim=lim, keep={"D"})) == ["A"]
    assert keys(planned(space, k=1, lim=lim, keep={"D"})) == ["B"]


def test_entries_short_of_k_accesses_go_first_least_recent_first() -> None:
    space = [c("P1", 1, 4), c("P3", 3), c("P2", 2), c("P4", 5)]
    assert keys(planned(space, lim=limits(entries=3), keep={"P4"})) == ["P2"]
    assert keys(planned(space, lim=limits(entries=1), keep={"P4"})) == ["P2", "P3", "P1"]


def test_pinned_entries_are_never_chosen() -> None:
    space = [c("old", 1, pinned=True), c("older", 0, pinned=True), c("loose", 5, 6), c("new", 7)]
    assert keys(planned(space, lim=limits(entries=3), keep={"new"})) == ["loose"]
    out = planned(space, lim=limits(entries=2), keep={"new"})
    assert out == Refusal("max_entries_per_space", 2, 3)


def test_kept_entries_are_never_chosen() -> None:
    space = [c("written", 1), c("other", 2, 3)]
    assert keys(planned(space, lim=limits(entries=1), keep={"written"})) == ["other"]
    out = planned(space, lim=limits(entries=1), keep={"written", "other"})
    assert out == Refusal("max_entries_per_space", 1, 2)


def test_it_stops_once_enough_bytes_are_freed() -> None:
    space = [c("a", 1, size=300), c("b", 2, size=300), c("c", 3, size=300), c("y", 4, size=700)]
    # 1600 bytes against 1024: two 300-byte entries make it 1000; a third is not taken.
    out = planned(space, lim=limits(space_bytes=1024), keep={"y"})
    assert keys(out) == ["a", "b"]


def test_nothing_is_chosen_and_nothing_read_within_the_budgets() -> None:
    out = plan(
        Usage(WRITER, 2, 2, 2, 2),
        untouched(),
        untouched(),
        {2: untouched()},
        k=2,
        limits=limits(entries=2, budget=2, user=2),
    )
    assert out == []


def test_only_as_many_candidates_are_read_as_are_evicted() -> None:
    read: list[str] = []

    def source(xs: list[Candidate[str]]) -> Iterator[Candidate[str]]:
        for x in xs:
            read.append(x.key)
            yield x

    space = [c(f"e{i:04d}", i, size=10) for i in range(1000)]
    new = c("new", 5000, size=30)
    out = plan(
        Usage(WRITER, 1001, 10030, 10030, 10030),
        source([*space, new]),
        source([*space, new]),
        {},
        k=2,
        limits=limits(space_bytes=10000),
        keep={"new"},
    )
    assert keys(out) == ["e0000", "e0001", "e0002"] and read == ["e0000", "e0001", "e0002"]


def test_the_daemon_budget_takes_the_best_victim_of_any_space() -> None:
    space = [c("s1", 5, 6, size=400), c("new", 9, size=400)]
    others = [c("o1", 1, 2, size=400, owner=2), c("o2", 3, size=400, owner=2)]
    # 1600 bytes against 1200: one must go; o2 has fewer than K accesses.
    assert keys(planned(space, (), others, lim=limits(budget=1200), keep={"new"})) == ["o2"]


def test_the_spaces_own_limit_comes_first_then_the_budget_from_what_is_left() -> None:
    space = [c("s1", 1, 2, size=100), c("s2", 3, 4, size=100), c("new", 9, size=100)]
    others = [c("o1", 0, 5, size=500, owner=2)]
    # Space: 3 entries against 2, so s1 (oldest 2nd-last access of the space) goes.  Budget:
    # 800 - 100 = 700 against 600: o1 (2nd-last access 0) goes before s2, and s1 is not
    # taken twice.
    out = planned(space, (), others, lim=limits(entries=2, budget=600), keep={"new"})
    assert keys(out) == ["s1", "o1"]


def test_refused_when_nothing_can_free_enough() -> None:
    # A pinned 500 and an unpinned 300 cannot make room for a kept 900 in 1024 bytes.
    space = [c("p", 1, size=500, pinned=True), c("u", 2, size=300), c("new", 3, size=900)]
    out = planned(space, lim=limits(space_bytes=1024), keep={"new"})
    assert out == Refusal("max_bytes_per_space", 1024, 1400)

    others = [c("o", 0, size=200, owner=2)]
    out = planned(space, (), others, lim=limits(budget=1024), keep={"new"})
    assert out == Refusal("budget_bytes", 1024, 1400)


def test_equal_ranks_go_in_key_order() -> None:
    # Keys as the memory manager makes them, (uid, space, id): uid first, then space, then id.
    def t(key: tuple[int, str, int], *accesses: int) -> Candidate[tuple[int, str, int]]:
        return Candidate(key, 1, accesses, owner=key[0])

    space = [t((1, "s", 9), 5), t((1, "s", 2), 5), t((1, "t", 9), 5)]
    new = t((1, "s", 10), 9)
    mine = ordered([*space, new], 2)
    out = plan(Usage(1, 4, 4, 4, 4), mine, mine, {}, k=2, limits=limits(entries=1), keep={new.key})
    assert not isinstance(out, Refusal)
    assert [x.key for x in out] == [(1, "s", 2), (1, "s", 9), (1, "t", 9)]
    # The daemon budget draws on the writer and the others alike, in key order too.
    others = {9: [t((9, "a", 1), 5)], 0: [t((0, "z", 7), 5)]}
    out = plan(
        Usage(1, 1, 1, 1, 3, {0: 1, 1: 1, 9: 1}),
        [new],
        [new],
        others,
        k=2,
        limits=limits(budget=2),
        keep={new.key},
    )
    assert not isinstance(out, Refusal)
    assert [x.key for x in out] == [(0, "z", 7)]


def test_the_writers_limit_takes_from_all_its_spaces_and_no_one_elses() -> None:
    space = [c("s1", 5, 6, size=300), c("new", 9, size=300)]
    mine = [c("m1", 1, 2, size=300), c("m2", 3, size=300)]
    others = [c("o1", 0, size=300, owner=2)]  # the best-ranked entry, but someone else's
    # The writer holds 1200 against 700: m2 (fewer than K accesses), then m1, go.
    out = planned(space, mine, others, lim=limits(user=700), keep={"new"})
    assert keys(out) == ["m2", "m1"]


def test_refused_when_only_the_writers_pinned_entries_could_meet_its_limit() -> None:
    space = [c("p", 1, size=500, pinned=True), c("new", 2, size=300)]
    others = [c("o1", 0, size=900, owner=2)]
    out = planned(space, (), others, lim=limits(user=700), keep={"new"})
    assert out == Refusal("max_bytes_per_user", 700, 800)


def test_the_daemon_budget_takes_from_owners_above_their_fair_share_first() -> None:
    # Budget 900 for three owners: a fair share of 300.  Owner 2 holds 900, owner 3 holds
    # 200: owner 3's entry ranks best (fewer than K accesses), but owner 2's go, until the
    # budget holds (1400 -> 800), and owner 3 keeps its entry.
    space = [c("new", 9, size=300)]
    big = [c("b1", 4, 5, size=300, owner=2), c("b2", 6, 7, size=300, owner=2)]
    big.append(c("b3", 6, 8, size=300, owner=2))
    others = [*big, c("t1", 1, size=200, owner=3)]
    assert keys(planned(space, (), others, lim=limits(budget=900), keep={"new"})) == ["b1", "b2"]
    # Plain LRU-K over everyone would have taken t1 first.
    everyone = [*space, *others]
    assert keys(planned(everyone, lim=limits(space_bytes=900)))[0] == "t1"


def test_once_no_owner_above_its_share_has_an_entry_left_everyone_is_a_candidate() -> None:
    # Budget 600, fair share 200.  Owner 2 is above it: its one evictable entry goes first.
    # Its pinned entry keeps it above, with nothing left to take: the next victim is LRU-K's
    # choice among everyone, t1 (last access 1) before the writer's own (last access 2).
    space = [c("mine", 2, size=100), c("new", 9, size=100)]
    others = [c("b1", 5, 6, size=300, owner=2), c("pin", 0, size=400, pinned=True, owner=2)]
    others.append(c("t1", 1, size=100, owner=3))
    assert keys(planned(space, (), others, lim=limits(budget=600), keep={"new"})) == ["b1", "t1"]


def test_pinned_entries_above_a_fair_share_do_not_push_others_out_first() -> None:
    # Owner 2's 900 bytes are pinned: nothing of it can go, so the choice falls to LRU-K
    # among everyone's evictable entries, and the writer's own older entry goes first.
    space = [c("mine", 1, size=100), c("new", 9, size=100)]
    others = [c("pin", 0, size=900, pinned=True, owner=2), c("t1", 3, size=100, owner=3)]
    assert keys(planned(space, (), others, lim=limits(budget=1150), keep={"new"})) == ["mine"]

"""LRU-K planning alone (no storage, no event loop): which entries leave RAM, in which
order, and when no choice of them can do."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from aiosd.managers.lruk import Candidate, Limits, Refusal, Usage, plan, rank

ROOMY = 1 << 40


def c(key: str, *accesses: int, size: int = 1, pinned: bool = False) -> Candidate[str]:
    return Candidate(key, size, accesses, pinned)


def limits(entries: int = ROOMY, space_bytes: int = ROOMY, budget: int = ROOMY) -> Limits:
    return Limits(entries, space_bytes, budget)


def usage(space: Sequence[Candidate[str]], others: Sequence[Candidate[str]] = ()) -> Usage:
    size = sum(x.size for x in space)
    return Usage(len(space), size, size + sum(x.size for x in others))


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


def test_the_victim_has_the_oldest_kth_most_recent_access() -> None:
    # A's last access (8) is the newest, but its 2nd-last (3) is the oldest: LRU-2 takes A
    # where plain LRU takes B (last access 6).
    space = [c("A", 3, 8), c("B", 4, 6), c("C", 5, 7), c("D", 9)]
    lim = limits(entries=3)
    assert keys(plan(usage(space), space, [], k=2, limits=lim, keep={"D"})) == ["A"]
    assert keys(plan(usage(space), space, [], k=1, limits=lim, keep={"D"})) == ["B"]


def test_entries_short_of_k_accesses_go_first_least_recent_first() -> None:
    space = [c("P1", 1, 4), c("P3", 3), c("P2", 2), c("P4", 5)]
    assert keys(plan(usage(space), space, [], k=2, limits=limits(entries=3), keep={"P4"})) == ["P2"]
    assert keys(plan(usage(space), space, [], k=2, limits=limits(entries=1), keep={"P4"})) == [
        "P2",
        "P3",
        "P1",
    ]


def test_pinned_entries_are_never_chosen() -> None:
    space = [c("old", 1, pinned=True), c("older", 0, pinned=True), c("loose", 5, 6), c("new", 7)]
    assert keys(plan(usage(space), space, [], k=2, limits=limits(entries=3), keep={"new"})) == [
        "loose"
    ]
    out = plan(usage(space), space, [], k=2, limits=limits(entries=2), keep={"new"})
    assert out == Refusal("max_entries_per_space", 2, 3)


def test_kept_entries_are_never_chosen() -> None:
    space = [c("written", 1), c("other", 2, 3)]
    assert keys(plan(usage(space), space, [], k=2, limits=limits(entries=1), keep={"written"})) == [
        "other"
    ]
    out = plan(usage(space), space, [], k=2, limits=limits(entries=1), keep={"written", "other"})
    assert out == Refusal("max_entries_per_space", 1, 2)


def test_it_stops_once_enough_bytes_are_freed() -> None:
    space = [c("a", 1, size=300), c("b", 2, size=300), c("c", 3, size=300), c("y", 4, size=700)]
    # 1600 bytes against 1024: two 300-byte entries make it 1000; a third is not taken.
    out = plan(usage(space), space, [], k=2, limits=limits(space_bytes=1024), keep={"y"})
    assert keys(out) == ["a", "b"]


def test_nothing_is_chosen_and_nothing_read_within_the_budgets() -> None:
    out = plan(Usage(2, 2, 2), untouched(), untouched(), k=2, limits=limits(entries=2, budget=2))
    assert out == []


def test_the_daemon_budget_takes_the_best_victim_of_any_space() -> None:
    space = [c("s1", 5, 6, size=400), c("new", 9, size=400)]
    others = [c("o1", 1, 2, size=400), c("o2", 3, size=400)]
    # 1600 bytes against 1200: one must go; o2 has fewer than K accesses.
    out = plan(usage(space, others), space, others, k=2, limits=limits(budget=1200), keep={"new"})
    assert keys(out) == ["o2"]


def test_the_spaces_own_limit_comes_first_then_the_budget_from_what_is_left() -> None:
    space = [c("s1", 1, 2, size=100), c("s2", 3, 4, size=100), c("new", 9, size=100)]
    others = [c("o1", 0, 5, size=500)]
    # Space: 3 entries against 2, so s1 (oldest 2nd-last access of the space) goes.  Budget:
    # 800 - 100 = 700 against 600: o1 (2nd-last access 0) goes before s2, and s1 is not
    # taken twice.
    lim = limits(entries=2, budget=600)
    out = plan(usage(space, others), space, others, k=2, limits=lim, keep={"new"})
    assert keys(out) == ["s1", "o1"]


def test_refused_when_nothing_can_free_enough() -> None:
    # A pinned 500 and an unpinned 300 cannot make room for a kept 900 in 1024 bytes.
    space = [c("p", 1, size=500, pinned=True), c("u", 2, size=300), c("new", 3, size=900)]
    out = plan(usage(space), space, [], k=2, limits=limits(space_bytes=1024), keep={"new"})
    assert out == Refusal("max_bytes_per_space", 1024, 1400)

    others = [c("o", 0, size=200)]
    out = plan(usage(space, others), space, others, k=2, limits=limits(budget=1024), keep={"new"})
    assert out == Refusal("budget_bytes", 1024, 1400)


def test_equal_ranks_go_in_key_order_whatever_order_the_candidates_come_in() -> None:
    # Keys as the memory manager makes them, (uid, space, id): uid first, then space, then id.
    def t(key: tuple[int, str, int], *accesses: int) -> Candidate[tuple[int, str, int]]:
        return Candidate(key, 1, accesses)

    space = [t((2, "s", 1), 5), t((1, "t", 9), 5), t((1, "s", 9), 5), t((1, "s", 2), 5)]
    new = t((3, "s", 1), 9)
    lim = limits(entries=2)
    out = plan(Usage(5, 5, 5), [*space, new], [], k=2, limits=lim, keep={new.key})
    assert not isinstance(out, Refusal)
    assert [x.key for x in out] == [(1, "s", 2), (1, "s", 9), (1, "t", 9)]
    # The daemon budget draws on the space and the others alike, in key order too.
    others = [t((9, "a", 1), 5), t((0, "z", 7), 5)]
    out = plan(Usage(1, 1, 3), [new], others, k=2, limits=limits(budget=2), keep={new.key})
    assert not isinstance(out, Refusal)
    assert [x.key for x in out] == [(0, "z", 7)]

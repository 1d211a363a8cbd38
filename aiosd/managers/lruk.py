"""LRU-K victim planning for short-term memory: pure, with no I/O and no event loop.

Every entry keeps the logical times of its last K accesses.  The victim is the entry whose
K-th most recent access is the oldest (the largest backward K-distance); entries with fewer
than K accesses have an infinite distance and go first, the least recently used of them
first (O'Neil, O'Neil and Weikum, "The LRU-K page replacement algorithm", SIGMOD 1993).
Entries of equal rank go in the order of their keys (the memory manager's are
``(uid, space, id)``), whatever order the candidates come in.

:func:`plan` answers one question: which entries must leave RAM so that the space being
written and the whole daemon are back within their budgets.  It changes nothing; the memory
manager decides which entries are candidates and moves the chosen ones to storage.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar


class _Key(Hashable, Protocol):
    """A candidate's key: hashable, and ordered, so that ties in rank break the same way."""

    def __lt__(self, other: Any, /) -> bool: ...


K = TypeVar("K", bound=_Key)


@dataclass(frozen=True, slots=True)
class Candidate(Generic[K]):
    """An entry as the planner sees it; ``accesses`` are logical times, oldest first."""

    key: K
    size: int
    accesses: Sequence[int]
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class Limits:
    """The budgets: entries and bytes of one space, bytes of the whole daemon."""

    max_entries_per_space: int
    max_bytes_per_space: int
    budget_bytes: int


@dataclass(frozen=True, slots=True)
class Usage:
    """What RAM holds: the written space's entries and bytes, and the daemon's bytes."""

    entries: int
    bytes: int
    total: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """No choice of victims can do: ``limit`` (``value``) stays exceeded, at ``needed``."""

    limit: Literal["max_entries_per_space", "max_bytes_per_space", "budget_bytes"]
    value: int
    needed: int


def rank(accesses: Sequence[int], k: int) -> tuple[int, int]:
    """Sort key, victim first: the K-th most recent access (-1 if fewer than K), then the last."""
    kth = accesses[-k] if len(accesses) >= k else -1
    last = accesses[-1] if accesses else -1
    return (kth, last)


# Equal ranks break by key, so the victims do not depend on the order candidates come in;
# the sequence number after it means two candidates are never compared themselves.
_Item = tuple[tuple[int, int], K, int, Candidate[K]]


def _items(
    candidates: Iterable[Candidate[K]], k: int, keep: Collection[K], seq: Iterator[int]
) -> list[_Item[K]]:
    return [
        (rank(c.accesses, k), c.key, next(seq), c)
        for c in candidates
        if not c.pinned and c.key not in keep
    ]


def plan(
    usage: Usage,
    space: Iterable[Candidate[K]],
    others: Iterable[Candidate[K]],
    *,
    k: int,
    limits: Limits,
    keep: Collection[K] = (),
) -> list[Candidate[K]] | Refusal:
    """The victims, in eviction order, that bring every budget back within its limit.

    ``space`` holds the entries of the space being written; ``others`` the entries of other
    spaces that may be evicted for the daemon budget.  Pinned candidates and those whose key
    is in ``keep`` are never chosen.  The space's own limits are met from its own entries
    first; the daemon budget then from every candidate left.  A :class:`Refusal` means no
    choice of victims would do, so none should be evicted.  The iterables are only read
    when a budget is exceeded.
    """
    seq = itertools.count()
    entries, size, total = usage.entries, usage.bytes, usage.total
    victims: list[Candidate[K]] = []
    local: list[_Item[K]] | None = None

    def over_space() -> bool:
        return entries > limits.max_entries_per_space or size > limits.max_bytes_per_space

    if over_space():
        local = _items(space, k, keep, seq)
        heapq.heapify(local)
        while over_space():
            if not local:
                if entries > limits.max_entries_per_space:
                    return Refusal("max_entries_per_space", limits.max_entries_per_space, entries)
                return Refusal("max_bytes_per_space", limits.max_bytes_per_space, size)
            victim = heapq.heappop(local)[3]
            victims.append(victim)
            entries -= 1
            size -= victim.size
            total -= victim.size
    if total > limits.budget_bytes:
        pool = local if local is not None else _items(space, k, keep, seq)
        pool.extend(_items(others, k, keep, seq))
        heapq.heapify(pool)
        while total > limits.budget_bytes:
            if not pool:
                return Refusal("budget_bytes", limits.budget_bytes, total)
            victim = heapq.heappop(pool)[3]
            victims.append(victim)
            total -= victim.size
    return victims

"""LRU-K victim planning for short-term memory: pure, with no I/O and no event loop.

Every entry keeps the logical times of its last K accesses.  The victim is the entry whose
K-th most recent access is the oldest (the largest backward K-distance); entries with fewer
than K accesses have an infinite distance and go first, the least recently used of them
first (O'Neil, O'Neil and Weikum, "The LRU-K page replacement algorithm", SIGMOD 1993).
Entries of equal rank go in the order of their keys (the memory manager's are
``(uid, space, id)``).

:func:`plan` answers one question: which entries must leave RAM so that the space being
written, its owner and the whole daemon are back within their budgets.  It changes nothing;
the memory manager decides which entries are candidates and moves the chosen ones to storage.

Candidates come **in victim order** and are read only as far as needed, so planning costs
what it evicts, not what RAM holds: the memory manager keeps each space's entries in a
binary heap by rank, and :func:`walk` reads a heap in order without changing it.

The daemon budget is shared fairly: while some owners hold more than their fair share (the
budget divided by the owners holding memory), victims come from them first, so one owner's
use does not push out the entries of owners within their share.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Collection, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar


class _Key(Hashable, Protocol):
    """A candidate's key: hashable, and ordered, so that ties in rank break the same way."""

    def __lt__(self, other: Any, /) -> bool: ...


K = TypeVar("K", bound=_Key)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Candidate(Generic[K]):
    """An entry as the planner sees it; ``accesses`` are logical times, oldest first.

    ``size`` is what the entry costs in RAM; ``owner`` the user it belongs to.
    """

    key: K
    size: int
    accesses: Sequence[int]
    pinned: bool = False
    owner: int = 0


@dataclass(frozen=True, slots=True)
class Limits:
    """The budgets: entries and bytes of one space, bytes of one owner, of the whole daemon."""

    max_entries_per_space: int
    max_bytes_per_space: int
    max_bytes_per_user: int
    budget_bytes: int


@dataclass(frozen=True, slots=True)
class Usage:
    """What RAM holds: the written space's entries and bytes, the writer's bytes, the
    daemon's bytes, and (read only when the daemon budget is exceeded) every owner's."""

    writer: int
    entries: int
    bytes: int
    user: int
    total: int
    owners: Mapping[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Refusal:
    """No choice of victims can do: ``limit`` (``value``) stays exceeded, at ``needed``."""

    limit: Literal[
        "max_entries_per_space", "max_bytes_per_space", "max_bytes_per_user", "budget_bytes"
    ]
    value: int
    needed: int


def rank(accesses: Sequence[int], k: int) -> tuple[int, int]:
    """Sort key, victim first: the K-th most recent access (-1 if fewer than K), then the last."""
    kth = accesses[-k] if len(accesses) >= k else -1
    last = accesses[-1] if accesses else -1
    return (kth, last)


def order(c: Candidate[K], k: int) -> tuple[tuple[int, int], K]:
    """A candidate's place in victim order: its rank, then its key."""
    return (rank(c.accesses, k), c.key)


def ordered(candidates: Iterable[Candidate[K]], k: int) -> list[Candidate[K]]:
    """Candidates in victim order (for callers that keep no order of their own)."""
    return sorted(candidates, key=lambda c: order(c, k))


def walk(heap: Sequence[T]) -> Iterator[T]:
    """The items of a binary min-heap (as :mod:`heapq` keeps one) in ascending order.

    The heap is not changed, and reading the first n items costs O(n log n) whatever its
    size: the smallest item not read yet is always a child of one already read.  The heap
    must not change while the walk is read.
    """
    if not heap:
        return
    frontier: list[tuple[T, int]] = [(heap[0], 0)]
    while frontier:
        item, i = heapq.heappop(frontier)
        yield item
        for child in (2 * i + 1, 2 * i + 2):
            if child < len(heap):
                heapq.heappush(frontier, (heap[child], child))


@dataclass
class _Plan(Generic[K]):
    """The usage as victims are taken, and the victims so far."""

    usage: Usage
    k: int
    keep: Collection[K]
    entries: int = 0
    size: int = 0
    user: int = 0
    total: int = 0
    victims: list[Candidate[K]] = field(default_factory=list)
    taken: set[K] = field(default_factory=set)

    def __post_init__(self) -> None:
        u = self.usage
        self.entries, self.size, self.user, self.total = u.entries, u.bytes, u.user, u.total

    def eligible(self, c: Candidate[K]) -> bool:
        return not c.pinned and c.key not in self.keep and c.key not in self.taken

    def next(self, source: Iterator[Candidate[K]]) -> Candidate[K] | None:
        """The next candidate of ``source`` that may be taken, if any."""
        return next((c for c in source if self.eligible(c)), None)

    def take(self, victim: Candidate[K], in_space: bool) -> None:
        self.victims.append(victim)
        self.taken.add(victim.key)
        if in_space:
            self.entries -= 1
            self.size -= victim.size
        if victim.owner == self.usage.writer:
            self.user -= victim.size
        self.total -= victim.size


def plan(
    usage: Usage,
    space: Iterable[Candidate[K]],
    user: Iterable[Candidate[K]],
    others: Mapping[int, Iterable[Candidate[K]]],
    *,
    k: int,
    limits: Limits,
    keep: Collection[K] = (),
) -> list[Candidate[K]] | Refusal:
    """The victims, in eviction order, that bring every budget back within its limit.

    Every source gives candidates in victim order (:func:`order`): ``space`` those of the
    space being written, ``user`` all of the writer's (that space's included), ``others``
    each other owner's.  Pinned candidates and those whose key is in ``keep`` are never
    chosen, and a candidate given twice is taken once.  The space's own limits are met from
    its own entries first, the writer's limit then from all the writer's entries, and the
    daemon budget from every owner's: first from the owners above their fair share
    (``budget_bytes`` divided by the owners holding memory, ``usage.owners``), the best
    ranked of their entries first, then, once none of them has one left, from everyone's.
    A :class:`Refusal` means no choice of victims would do, so none should be evicted.
    Sources are read only as far as the victims they give, and only when a budget that
    needs them is exceeded.
    """
    p = _Plan(usage, k, keep)

    def over_space() -> bool:
        return p.entries > limits.max_entries_per_space or p.size > limits.max_bytes_per_space

    if over_space():
        local = iter(space)
        while over_space():
            victim = p.next(local)
            if victim is None:
                if p.entries > limits.max_entries_per_space:
                    return Refusal("max_entries_per_space", limits.max_entries_per_space, p.entries)
                return Refusal("max_bytes_per_space", limits.max_bytes_per_space, p.size)
            p.take(victim, True)
    mine: Iterator[Candidate[K]] | None = None
    if p.user > limits.max_bytes_per_user:
        mine = iter(user)
        while p.user > limits.max_bytes_per_user:
            victim = p.next(mine)
            if victim is None:
                return Refusal("max_bytes_per_user", limits.max_bytes_per_user, p.user)
            p.take(victim, False)
    if p.total > limits.budget_bytes:
        sources = {o: iter(s) for o, s in others.items()}
        sources[usage.writer] = mine if mine is not None else iter(user)
        if not _share(p, sources, limits.budget_bytes):
            return Refusal("budget_bytes", limits.budget_bytes, p.total)
    return p.victims


#: An owner's next candidate, in victim order (the sequence number breaks no tie that
#: matters: keys differ; it keeps two candidates from ever being compared themselves).
_Head = tuple[tuple[tuple[int, int], K], int, int, Candidate[K]]


def _share(p: _Plan[K], sources: dict[int, Iterator[Candidate[K]]], budget: int) -> bool:
    """Take victims for the daemon budget, from the owners above their fair share first.

    Each owner's next candidate (its head) sits in ``everyone`` and, while the owner is
    above its share, in ``above``; a head already taken or of an owner no longer above is
    skipped when it comes up.  Whether the budget holds in the end.
    """
    owners = dict(p.usage.owners)
    for victim in p.victims:  # taken for the space's and the writer's limits
        owners[victim.owner] = owners.get(victim.owner, 0) - victim.size
    fair = budget // max(1, sum(1 for b in owners.values() if b > 0))
    seq = itertools.count()
    everyone: list[_Head[K]] = []
    above: list[_Head[K]] = []

    def advance(owner: int) -> None:
        c = p.next(sources[owner])
        if c is not None:
            head = (order(c, p.k), next(seq), owner, c)
            heapq.heappush(everyone, head)
            if owners.get(owner, 0) > fair:
                heapq.heappush(above, head)

    for owner in sources:
        advance(owner)
    while p.total > budget:
        chosen = _pop(above, p, lambda o: owners.get(o, 0) > fair) or _pop(everyone, p, None)
        if chosen is None:
            return False
        p.take(chosen, False)
        owners[chosen.owner] = owners.get(chosen.owner, 0) - chosen.size
        advance(chosen.owner)
    return True


def _pop(
    heap: list[_Head[K]], p: _Plan[K], still: Callable[[int], bool] | None
) -> Candidate[K] | None:
    """The best head of ``heap`` not taken yet (and whose owner is ``still`` eligible)."""
    while heap:
        _, _, owner, c = heapq.heappop(heap)
        if c.key not in p.taken and (still is None or still(owner)):
            return c
    return None

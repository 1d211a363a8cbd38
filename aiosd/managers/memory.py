"""Memory manager: short-term memory of agents and client sessions, in RAM, with LRU-K.

Memory lives in RAM per ``(uid, space)``; a space is a client session (by default) or a name
the client chooses.  Every entry keeps the times of its last K accesses on one manager-wide
logical clock (add, get and update are accesses; search is not).

What RAM holds is counted as it costs: an entry costs its content and its tags in UTF-8
(which is how they are held) plus :data:`ENTRY_OVERHEAD` and :data:`TAG_OVERHEAD` per tag,
a space :data:`SPACE_OVERHEAD` plus its name; the constants are measured
(``tests/unit/managers/test_memory_bounds.py`` checks them against the Python heap).

Budgets: entries and bytes per space, spaces and bytes per user, pinned bytes per user and
of everyone, and bytes for the whole daemon.  After every add, update or reload, while a
budget is exceeded one unpinned entry is evicted by LRU-K (planned in
:mod:`aiosd.managers.lruk`): the entry whose K-th most recent access is the oldest; entries
with fewer than K accesses (infinite backward K-distance) go first, the least recently used of
them first.  A space's and a user's budgets evict from that space and that user only; the
daemon budget evicts from the users above their fair share first.  The entry being written
is never its own victim.  If only pinned entries are left the write is refused
(QuotaExceeded) and nothing changes.  Pinned bytes are never evicted, so they are bounded
when written instead: per user, and for everyone together at most half the daemon budget,
which leaves the other half to unpinned entries whoever pins.  Evicting moves the entry to
the owner's storage, collection ``_memory.<space>`` and key ``str(id)``: search still finds
it there, and get or update brings it back into RAM.  Each space keeps its unpinned entries
in a heap by LRU-K rank, which planning reads in order only as far as the victims: a write
costs what it evicts, not what RAM holds.

Spaces of different users never meet: every lookup is keyed by uid, so another user's id is
simply not found.

Each user's calls run one at a time under that user's lock, storage I/O included, so every
call is atomic for its user and users' calls run side by side.  What all users share (the
daemon's byte count, the logical clock, the choice of victims) is read and updated on the
event loop with no await in between, which makes each such step atomic without a lock.

The daemon budget may evict any user's unpinned entries, whatever calls are under way: a
user cannot keep its entries in RAM by keeping calls busy.  Each owner's victims move under
that owner's lock, held only until they are out.  A write whose victims belong to users with
calls under way undoes its change, lets its locks go and starts again, waiting for its own
and those users' locks in ascending uid order (:meth:`MemoryManager._write`): a write waits
only for a lock above all those it holds, so writes never wait for each other in a circle.
Victims count as gone only once they are in storage: a second write that picks them waits
for them instead of evicting more, and once no write is under way every budget holds.  A
write is refused for other users' calls ("try again") only when users whose calls already
got in its way (a victim's owner busy, or a victim used, while it planned) do so again
more than :data:`CONTENDED_RETRIES` times.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass, field
from typing import Any, TypedDict, TypeVar

from aiosd.config import MemoryConfig
from aiosd.errors import AiosError, InvalidParams, NotFound, QuotaExceeded
from aiosd.managers import lruk
from aiosd.managers.storage import StorageManager, UserStore

log = logging.getLogger(__name__)

#: Half-life of the recency weight of search scores, in accesses of the logical clock.
RECENCY_HALF_LIFE = 50
#: Candidates asked of the storage's full-text search per memory search (before filtering).
STORED_CANDIDATES = 500
_PAGE = 1000
#: Times a write may see the same users' calls get in its way again (holding a victim's
#: owner's lock, or using a victim, while it plans) before it is refused with "try again".
CONTENDED_RETRIES = 8

# What the daemon holds besides the UTF-8 bytes of content, tags and space names, measured
# with tracemalloc on CPython 3.11 (tests/unit/managers/test_memory_bounds.py holds the
# accounting to within a factor of what the heap really grows by):
#: Per entry: the entry object, its two times, its access times, its id, the space's table
#: slot and its places in the space's victim order.  10,000 small entries in one space grew
#: the heap by about 405 bytes each beyond their content; entries read often, by up to
#: about 495 (older places in the order, until they are dropped).
ENTRY_OVERHEAD = 480
#: Per tag: a bytes object's header and its place in the entry's tuple (about 40 bytes).
TAG_OVERHEAD = 48
#: Per space, besides its name: the space object, its entry table, its victim order, and
#: its places in the manager's and its owner's tables (about 530 bytes for a space holding
#: one entry).
SPACE_OVERHEAD = 576

T = TypeVar("T")


class MemoryEntry(TypedDict):
    """An entry as callers see it; ``size`` is the content's length in UTF-8 bytes."""

    id: int
    content: str
    tags: list[str]
    pinned: bool
    created: float
    updated: float
    size: int


class WrittenEntry(MemoryEntry):
    """An entry added, read or changed; ``evicted``: ids of its space moved to storage."""

    evicted: list[int]


class MemoryHit(MemoryEntry):
    """One search hit, best first; ``evicted`` hits were found in storage."""

    score: float
    evicted: bool


class MemoryStats(TypedDict):
    """Totals over the daemon: accounted bytes (of them pinned), entries, spaces and users."""

    bytes: int
    pinned_bytes: int
    entries: int
    spaces: int
    users: int
    budget_bytes: int


class MemoryUsage(TypedDict):
    """One user's memory in RAM: accounted bytes (of them pinned), entries and spaces."""

    bytes: int
    pinned_bytes: int
    entries: int
    spaces: int


def collection_of(space: str) -> str:
    """The storage collection that holds a space's evicted entries."""
    return f"_memory.{space}"


def check_content(content: str, limit: int) -> None:
    """Refuse content longer than ``limit`` bytes (UTF-8), naming the field."""
    size = len(content.encode())
    if size > limit:
        raise InvalidParams(
            f"invalid params: content: {size} bytes, more than memory.max_entry_bytes ({limit})",
            data={"errors": [{"field": "content", "message": f"larger than {limit} bytes"}]},
        )


def _utf8(tags: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(t.encode() for t in tags)


def entry_cost(size: int, tags: Iterable[bytes]) -> int:
    """What an entry costs in RAM: content and tags in UTF-8 bytes, and the overheads."""
    return size + ENTRY_OVERHEAD + sum(len(t) + TAG_OVERHEAD for t in tags)


def space_cost(name: str) -> int:
    """What a space costs in RAM besides its entries."""
    return SPACE_OVERHEAD + len(name.encode())


@dataclass(slots=True)
class _Entry:
    """An entry in RAM.  Content and tags are held in UTF-8, as they are counted: a ``str``
    holding a single character beyond the Basic Multilingual Plane takes 4 bytes for every
    character."""

    id: int
    content: bytes
    tags: tuple[bytes, ...]
    pinned: bool
    created: float
    updated: float
    #: Logical times of the last K accesses, oldest first.
    accesses: tuple[int, ...] = ()
    #: Bytes of ``content``, and what the entry costs (:func:`entry_cost`), kept by
    #: :meth:`set`.
    size: int = field(init=False)
    cost: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.content)
        self.cost = entry_cost(self.size, self.tags)

    @classmethod
    def new(cls, id_: int, content: str, tags: list[str], pinned: bool) -> _Entry:
        now = time.time()
        return cls(id_, content.encode(), _utf8(tags), pinned, now, now)

    def set(self, content: bytes, tags: tuple[bytes, ...]) -> None:
        self.content, self.tags = content, tags
        self.__post_init__()

    def text(self) -> str:
        return self.content.decode()

    def tag_list(self) -> list[str]:
        return [t.decode() for t in self.tags]

    def public(self) -> MemoryEntry:
        return {
            "id": self.id,
            "content": self.text(),
            "tags": self.tag_list(),
            "pinned": self.pinned,
            "created": self.created,
            "updated": self.updated,
            "size": self.size,
        }

    def written(self, evicted: list[int]) -> WrittenEntry:
        return WrittenEntry(**self.public(), evicted=evicted)

    def hit(self, score: float, evicted: bool) -> MemoryHit:
        return MemoryHit(**self.public(), score=round(score, 6), evicted=evicted)

    def metadata(self) -> dict[str, Any]:
        return {
            "tags": self.tag_list(),
            "created": self.created,
            "updated": self.updated,
            "pinned": self.pinned,
            "accesses": list(self.accesses),
        }

    @classmethod
    def stored(cls, id_: int, row: Mapping[str, Any]) -> _Entry:
        """Rebuild an entry from its storage row (``UserStore.get``)."""
        meta = row.get("metadata") or {}
        raw = row["value"]
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        created = float(meta.get("created", row.get("created", time.time())))
        tags = meta.get("tags", [])
        accesses = meta.get("accesses", [])
        return cls(
            id=id_,
            content=text.encode(),
            tags=_utf8(str(t) for t in tags) if isinstance(tags, list) else (),
            pinned=bool(meta.get("pinned", False)),
            created=created,
            updated=float(meta.get("updated", created)),
            accesses=tuple(int(a) for a in accesses) if isinstance(accesses, list) else (),
        )


@dataclass
class _Space:
    uid: int
    name: str
    next_id: int
    entries: dict[int, _Entry] = field(default_factory=dict)
    #: What the entries cost (:func:`entry_cost`); the space's own cost is its owner's.
    bytes: int = 0
    #: The unpinned entries in victim order: a binary heap of ``(*rank, id)``, one item
    #: pushed at every insert and access.  Items no longer true (the entry is gone, pinned,
    #: or accessed since) are skipped when read, and dropped once there are many of them
    #: (:meth:`MemoryManager._tidy`).  Ids only, so a stale item holds no entry in RAM.
    order: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class _Held:
    """What one user holds in RAM: spaces, accounted bytes (entries and spaces), of them
    pinned.  A user holding no space has no record."""

    spaces: dict[str, _Space] = field(default_factory=dict)
    bytes: int = 0
    pinned: int = 0


#: An entry as the planner names it: (uid, space, id).
_Ref = tuple[int, str, int]


def _ref(sp: _Space, e: _Entry) -> _Ref:
    return (sp.uid, sp.name, e.id)


def _candidates(sp: _Space, k: int) -> Iterator[lruk.Candidate[_Ref]]:
    """The space's unpinned entries in victim order, read from its heap as far as needed."""
    for kth, last, id_ in lruk.walk(sp.order):
        e = sp.entries.get(id_)
        if e is not None and not e.pinned and lruk.rank(e.accesses, k) == (kth, last):
            yield lruk.Candidate((sp.uid, sp.name, id_), e.cost, e.accesses, False, sp.uid)


def _merged(spaces: Iterable[_Space], k: int) -> Iterator[lruk.Candidate[_Ref]]:
    """The unpinned entries of several spaces in victim order."""
    return heapq.merge(*(_candidates(sp, k) for sp in spaces), key=lambda c: lruk.order(c, k))


class _UserLock:
    """A FIFO lock for one user's memory calls, with a :meth:`try_acquire` that never waits.

    asyncio.Lock cannot say whether acquiring would wait (a released lock may already be
    promised to a waiter that has not run yet), and a write that holds locks may take another
    only if that needs no waiting, save in ascending uid order (:meth:`MemoryManager._write`).
    """

    def __init__(self) -> None:
        self._held = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def free(self) -> bool:
        """Neither held nor waited for."""
        return not self._held and not self._waiters

    def try_acquire(self) -> bool:
        """Take the lock if that needs no waiting; whether it was taken."""
        if not self.free:
            return False
        self._held = True
        return True

    async def acquire(self) -> None:
        """Take the lock, after everyone who asked before."""
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed over just as the caller gave up: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Hand the lock to the first caller still waiting, else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._held = False


@dataclass(frozen=True, slots=True)
class _Victim:
    """A planned victim, with its access times then: a later access spoils the plan."""

    sp: _Space
    entry: _Entry
    accesses: tuple[int, ...]


class _Busy(Exception):
    """Planned victims belong to users (``uids``) whose calls are under way."""

    def __init__(self, uids: set[int], needed: int) -> None:
        super().__init__(sorted(uids))
        self.uids = frozenset(uids)
        #: The daemon's bytes in RAM when planned, for a refusal's message.
        self.needed = needed


@dataclass
class _Call:
    """One write's locks and evictions, kept across its starts (:meth:`MemoryManager._write`)."""

    uid: int
    #: Whether the caller is an administrator (the pinned budget keeps them a reserve).
    admin: bool = False
    #: Users whose locks the write holds now, its own included.
    held: set[int] = field(default_factory=set)
    #: Other users whose locks the write takes, with its own, at each start.
    wanted: set[int] = field(default_factory=set)
    #: What it moved to storage, over every start.
    evicted: list[_Ref] = field(default_factory=list)
    #: Users whose calls made it wait or start again, or spoiled its plan.
    contenders: set[int] = field(default_factory=set)
    #: Times users already among ``contenders`` did so again.
    retries: int = 0
    #: Users whose storage refused a victim: none of theirs is planned again by this write.
    unstorable: set[int] = field(default_factory=set)

    def evicted_from(self, sp: _Space) -> list[int]:
        """Ids of the moved entries of ``sp``'s space (never another user's)."""
        return [i for u, name, i in self.evicted if u == sp.uid and name == sp.name]

    def contended(self, uids: Collection[int], needed: int, budget: int) -> None:
        """Note that the calls of ``uids`` got in the way; refuse once they did too often.

        Each user's first time is free (there are finitely many users); only the times
        users already noted get in the way again count towards :data:`CONTENDED_RETRIES`.
        """
        if not set(uids) - self.contenders:
            self.retries += 1
            if self.retries > CONTENDED_RETRIES:
                raise _contended(budget, needed)
        self.contenders |= set(uids)


# --- work done on a user's store -------------------------------------------------------------


def _keys(s: UserStore, collection: str) -> list[str]:
    keys: list[str] = []
    after: str | None = None
    while True:
        page = s.list_keys(collection, "", _PAGE, after)
        keys.extend(e["key"] for e in page["entries"])
        if page["next"] is None:
            return keys
        after = page["next"]


def _max_id(s: UserStore, collection: str) -> int:
    return max((int(k) for k in _keys(s, collection) if k.isdigit()), default=0)


def _load(s: UserStore, collection: str, id_: int) -> Mapping[str, Any] | None:
    try:
        return s.get(collection, str(id_), None)
    except NotFound:
        return None


def _present(s: UserStore, collection: str, ids: list[int]) -> set[int]:
    return {i for i in ids if _load(s, collection, i) is not None}


def _purge(s: UserStore, collection: str, keep_pinned: bool) -> int:
    removed = 0
    for key in _keys(s, collection):
        if keep_pinned and s.get(collection, key, None)["metadata"].get("pinned"):
            continue
        s.purge(collection, key)
        removed += 1
    return removed


def _stored_matches(
    s: UserStore, collection: str, query: str
) -> list[tuple[int, Mapping[str, Any]]]:
    try:
        hits = s.search(query, [collection], {}, STORED_CANDIDATES, 0)
    except InvalidParams:
        return []
    out: list[tuple[int, Mapping[str, Any]]] = []
    for h in hits:
        if h["key"].isdigit():
            row = _load(s, collection, int(h["key"]))
            if row is not None:
                out.append((int(h["key"]), row))
    return out


def _score(content: str, tags: list[str], words: list[str], age: int) -> float:
    """Occurrences of the words × recency weight; 0 unless every word occurs."""
    text = content.lower()
    lowered = [t.lower() for t in tags]
    total = 0
    for w in words:
        n = text.count(w) + sum(t.count(w) for t in lowered)
        if n == 0:
            return 0.0
        total += n
    weight: float = 0.5 ** (max(age, 0) / RECENCY_HALF_LIFE)
    return total * weight


class MemoryManager:
    """Short-term memory per (uid, space), bounded by budgets, evicting to storage by LRU-K."""

    def __init__(self, storage: StorageManager, cfg: MemoryConfig) -> None:
        self.storage = storage
        self.cfg = cfg
        self._spaces: dict[tuple[int, str], _Space] = {}
        #: What each user holding a space holds.
        self._held: dict[int, _Held] = {}
        #: Accounted bytes in RAM (entries and spaces), and of them pinned, over every user.
        self._total = 0
        self._pinned = 0
        self._clock = 0
        #: Locks of users with a call in progress or waiting; a free lock holds no state, so
        #: it is dropped and the table never outgrows the calls under way.
        self._locks: dict[int, _UserLock] = {}
        #: Bytes some spaces may hold at most, below [memory] max_bytes_per_space: an agent's
        #: space has its memory_budget (by (uid, space); set while the agent runs).
        self._budgets: dict[tuple[int, str], int] = {}
        self._warn_pinned_budget()

    def set_budget(self, uid: int, space: str, limit: int | None) -> None:
        """Bound what ``space`` of ``uid`` holds to ``limit`` bytes (None or 0: only by the
        [memory] limits); applies from its next write on."""
        if limit:
            self._budgets[(uid, space)] = limit
        else:
            self._budgets.pop((uid, space), None)

    def configure(self, cfg: MemoryConfig) -> None:
        """Apply new [memory] settings; smaller budgets take effect at the next write."""
        k_changed = cfg.lru_k != self.cfg.lru_k
        self.cfg = cfg
        if k_changed:  # every rank changes with K
            for sp in self._spaces.values():
                self._reorder(sp)
        self._warn_pinned_budget()

    def pinned_budget(self) -> int:
        """Pinned bytes all users together may hold: ``pinned_budget_bytes``, but never more
        than half of ``budget_bytes``, so unpinned entries always have the other half."""
        return min(self.cfg.pinned_budget_bytes, self.cfg.budget_bytes // 2)

    def _warn_pinned_budget(self) -> None:
        if self.cfg.pinned_budget_bytes > self.cfg.budget_bytes // 2:
            log.warning(
                "memory: pinned_budget_bytes (%d) is more than half of budget_bytes (%d): "
                "%d applies",
                self.cfg.pinned_budget_bytes,
                self.cfg.budget_bytes,
                self.pinned_budget(),
            )

    # --- public API ---------------------------------------------------------------------------

    async def add(
        self,
        uid: int,
        space: str,
        content: str,
        tags: list[str],
        pinned: bool,
        *,
        admin: bool = False,
    ) -> WrittenEntry:
        """Add an entry; returns it with ``evicted``: ids of this space moved to storage.

        ``admin``: the caller is an administrator, who may pin beyond the users' pinned
        budget (by ``max_pinned_bytes_per_user``, see :meth:`_check_pinned`).
        """
        check_content(content, self.cfg.max_entry_bytes)

        async def body(call: _Call) -> WrittenEntry:
            created = (uid, space) not in self._spaces
            sp = await self._space(uid, space)
            e = _Entry.new(sp.next_id, content, tags, pinned)
            sp.next_id += 1
            self._touch(e)
            self._insert(sp, e)
            try:
                await self._make_room(sp, e, call, pinned)
            except BaseException:
                self._remove(sp, e)
                if sp.next_id == e.id + 1:
                    sp.next_id = e.id
                self._forget_if_new(sp, created)
                raise
            return e.written(call.evicted_from(sp))

        return await self._write(uid, body, admin)

    async def get(self, uid: int, space: str, id: int, *, admin: bool = False) -> WrittenEntry:
        """An entry (an access); an evicted one is brought back into RAM, which may evict.

        If no room can be made for it (only pinned entries could give it, or it is pinned
        and the pinned budgets are full, or the user has no room for another space), it is
        served from storage, where it stays.
        """

        async def body(call: _Call) -> WrittenEntry:
            found = self._resident(uid, space, id)
            if found is not None:
                e = found[1]
                self._touch(e)
                self._push(found[0], e)
                return e.written([])
            e = await self._fetch(uid, space, id)
            self._touch(e)
            created = (uid, space) not in self._spaces
            try:
                sp = await self._space(uid, space)
            except QuotaExceeded:
                return e.written([])
            sp.next_id = max(sp.next_id, id + 1)
            self._insert(sp, e)
            try:
                await self._make_room(sp, e, call, e.pinned)
            except QuotaExceeded:
                self._remove(sp, e)
                self._forget_if_new(sp, created)
                return e.written(call.evicted_from(sp))
            except BaseException:
                self._remove(sp, e)
                self._forget_if_new(sp, created)
                raise
            await self._unstore(uid, space, id)
            return e.written(call.evicted_from(sp))

        return await self._write(uid, body, admin)

    async def update(
        self,
        uid: int,
        space: str,
        id: int,
        content: str | None = None,
        tags: list[str] | None = None,
        pinned: bool | None = None,
        *,
        admin: bool = False,
    ) -> WrittenEntry:
        """Change an entry (an access); refused, changing nothing, if it cannot fit."""
        if content is not None:
            check_content(content, self.cfg.max_entry_bytes)

        async def body(call: _Call) -> WrittenEntry:
            found = self._resident(uid, space, id)
            reloaded = found is None
            created = (uid, space) not in self._spaces
            if found is not None:
                sp, e = found
                self._remove(sp, e)
            else:
                e = await self._fetch(uid, space, id)
                sp = await self._space(uid, space)
                sp.next_id = max(sp.next_id, id + 1)
            pinned_before = e.cost if e.pinned and not reloaded else 0
            before = (e.content, e.tags, e.pinned, e.updated, e.accesses)
            e.set(
                content.encode() if content is not None else e.content,
                _utf8(tags) if tags is not None else e.tags,
            )
            if pinned is not None:
                e.pinned = pinned
            e.updated = time.time()
            self._touch(e)
            self._insert(sp, e)
            try:
                await self._make_room(sp, e, call, e.pinned and e.cost > pinned_before)
            except BaseException:
                self._remove(sp, e)
                old, old_tags, e.pinned, e.updated, e.accesses = before
                e.set(old, old_tags)
                if not reloaded:
                    self._insert(sp, e)
                self._forget_if_new(sp, created)
                raise
            if reloaded:
                await self._unstore(uid, space, id)
            return e.written(call.evicted_from(sp))

        return await self._write(uid, body, admin)

    async def delete(self, uid: int, space: str, id: int) -> None:
        """Delete an entry, from RAM or (if evicted) from storage."""
        async with self._user(uid):
            found = self._resident(uid, space, id)
            if found is not None:
                self._remove(*found)
                return
            if not await self._unstore(uid, space, id):
                raise _not_found(space, id)

    async def clear(self, uid: int, space: str, keep_pinned: bool) -> int:
        """Remove a space's entries (pinned ones too unless ``keep_pinned``); returns how many."""
        async with self._user(uid):
            removed = 0
            sp = self._spaces.get((uid, space))
            if sp is not None:
                for e in list(sp.entries.values()):
                    if not (keep_pinned and e.pinned):
                        self._remove(sp, e)
                        removed += 1
            coll = collection_of(space)
            removed += await self.storage.run_existing(
                uid, lambda s: _purge(s, coll, keep_pinned), 0
            )
            return removed

    async def search(self, uid: int, space: str, query: str, limit: int) -> list[MemoryHit]:
        """Entries where every word occurs (case-insensitive) in content or tags, best first.

        Score: occurrences of the words × ``0.5 ** (accesses since the entry's last / 50)``.
        Evicted entries come from the storage's full-text index (whole words) and carry
        ``evicted: true``.  Searching is not an access.
        """
        words = [w.lower() for w in query.split()]
        if not words:
            raise InvalidParams(
                "invalid params: query: needs at least one word",
                data={"errors": [{"field": "query", "message": "needs at least one word"}]},
            )
        async with self._user(uid):
            now = self._clock
            hits: list[MemoryHit] = []
            sp = self._spaces.get((uid, space))
            resident = sp.entries if sp is not None else {}
            for e in resident.values():
                score = _score(e.text(), e.tag_list(), words, now - e.accesses[-1])
                if score > 0:
                    hits.append(e.hit(score, False))
            coll = collection_of(space)
            stored: list[tuple[int, Mapping[str, Any]]] = await self.storage.run_existing(
                uid, lambda s: _stored_matches(s, coll, query), []
            )
            for id_, row in stored:
                if id_ in resident:
                    continue
                e = _Entry.stored(id_, row)
                last = e.accesses[-1] if e.accesses else 0
                score = _score(e.text(), e.tag_list(), words, now - last)
                if score > 0:
                    hits.append(e.hit(score, True))
            hits.sort(key=lambda h: (-h["score"], -h["id"]))
            return hits[:limit]

    async def entries(self, uid: int, space: str) -> list[MemoryEntry]:
        """The space's entries in RAM, in id order (not an access)."""
        async with self._user(uid):
            sp = self._spaces.get((uid, space))
            if sp is None:
                return []
            return [sp.entries[i].public() for i in sorted(sp.entries)]

    async def evict(self, uid: int, space: str, ids: list[int]) -> None:
        """Move the given entries to storage now, even under budget (pinned ones too).

        Ids already in storage are left there; an id found nowhere is NotFound (and then
        nothing is moved).
        """
        async with self._user(uid):
            sp = self._spaces.get((uid, space))
            resident = sp.entries if sp is not None else {}
            elsewhere = [i for i in dict.fromkeys(ids) if i not in resident]
            if elsewhere:
                coll = collection_of(space)
                found: set[int] = await self.storage.run_existing(
                    uid, lambda s: _present(s, coll, elsewhere), set()
                )
                for i in elsewhere:
                    if i not in found:
                        raise _not_found(space, i)
            if sp is None:
                return
            for i in dict.fromkeys(ids):
                e = sp.entries.get(i)
                if e is not None:
                    await self._store(sp, e)
                    self._remove(sp, e)

    async def stats(self) -> MemoryStats:
        """Totals over the daemon: accounted bytes in RAM (of them pinned), entries, spaces
        and users holding memory.

        Taken without waiting for anyone's call: a write still moving its victims to storage
        is counted with them, so ``bytes`` may pass the budget until that write returns.
        """
        return {
            "bytes": self._total,
            "pinned_bytes": self._pinned,
            "entries": sum(len(sp.entries) for sp in self._spaces.values()),
            "spaces": len(self._spaces),
            "users": len(self._held),
            "budget_bytes": self.cfg.budget_bytes,
        }

    async def usage(self, uid: int) -> MemoryUsage:
        """What ``uid`` holds in RAM: accounted bytes (of them pinned), entries and spaces."""
        held = self._held.get(uid, _Held())
        return {
            "bytes": held.bytes,
            "pinned_bytes": held.pinned,
            "entries": sum(len(sp.entries) for sp in held.spaces.values()),
            "spaces": len(held.spaces),
        }

    async def persist_pinned(self) -> None:
        """At shutdown: move every pinned entry in RAM to its owner's storage."""
        for uid in sorted({uid for uid, _ in self._spaces}):
            async with self._user(uid):
                for sp in [sp for sp in self._spaces.values() if sp.uid == uid]:
                    for e in [e for e in sp.entries.values() if e.pinned]:
                        await self._move_to_storage(
                            sp, e, "pinned entry %d of uid %d space %r not kept"
                        )

    async def drop_session(self, uid: int, space: str) -> None:
        """A session ended: unpinned entries go (RAM and storage); pinned ones move to storage."""
        async with self._user(uid):
            coll = collection_of(space)
            await self.storage.run_existing(uid, lambda s: _purge(s, coll, True), 0)
            sp = self._spaces.get((uid, space))
            if sp is None:
                return
            for e in list(sp.entries.values()):
                if not e.pinned:
                    self._remove(sp, e)
                else:  # never lose a pinned entry: if storage refuses it, it stays in RAM
                    await self._move_to_storage(
                        sp, e, "kept pinned entry %d of uid %d space %r in RAM"
                    )
            if not sp.entries:
                self._drop(sp)

    # --- users' locks ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _user(self, uid: int) -> AsyncIterator[None]:
        """Hold ``uid``'s lock for one call (waiting for that user's earlier calls only)."""
        await self._lock(uid)
        try:
            yield
        finally:
            self._unlock(uid)

    async def _write(
        self, uid: int, body: Callable[[_Call], Awaitable[T]], admin: bool = False
    ) -> T:
        """Run a write's ``body`` under ``uid``'s lock, again with more locks while it needs them.

        A body whose victims belong to users with calls under way undoes its change and
        raises :class:`_Busy`; it then runs again holding those users' locks too.  Locks are
        taken in ascending uid order, and all let go before each new start, so a write waits
        only for locks above every lock it holds: writes never wait for each other in a
        circle.  Restarts are bounded: :meth:`_Call.contended` refuses a write that other
        users' calls keep getting in the way of.
        """
        call = _Call(uid, admin)
        while True:
            try:
                for u in sorted({uid} | call.wanted):
                    await self._lock(u)
                    call.held.add(u)
                return await body(call)
            except _Busy as busy:
                call.contended(busy.uids, busy.needed, self.cfg.budget_bytes)
                call.wanted |= busy.uids
            finally:
                for u in call.held:
                    self._unlock(u)
                call.held.clear()

    async def _lock(self, uid: int) -> None:
        """Take ``uid``'s lock, after the calls that asked for it before."""
        lock = self._locks.get(uid)
        if lock is None:
            lock = self._locks[uid] = _UserLock()
        try:
            await lock.acquire()
        except BaseException:
            self._forget(uid, lock)
            raise

    def _try_lock(self, uid: int) -> bool:
        """Take ``uid``'s lock if it is free now; never waits."""
        lock = self._locks.get(uid)
        if lock is None:
            lock = self._locks[uid] = _UserLock()
        return lock.try_acquire()

    def _unlock(self, uid: int) -> None:
        lock = self._locks[uid]
        lock.release()
        self._forget(uid, lock)

    def _let_go(self, call: _Call, uid: int) -> None:
        """Release a lock ``call`` holds before the call ends."""
        call.held.remove(uid)
        self._unlock(uid)

    def _forget(self, uid: int, lock: _UserLock) -> None:
        if lock.free and self._locks.get(uid) is lock:
            del self._locks[uid]

    def _free(self, uid: int) -> bool:
        """Whether no call holds or waits for ``uid``'s lock."""
        lock = self._locks.get(uid)
        return lock is None or lock.free

    # --- internals ----------------------------------------------------------------------------

    def _touch(self, e: _Entry) -> None:
        self._clock += 1
        e.accesses = (*e.accesses, self._clock)[-self.cfg.lru_k :]

    def _resident(self, uid: int, space: str, id_: int) -> tuple[_Space, _Entry] | None:
        """The space and the entry, if the entry is in RAM."""
        sp = self._spaces.get((uid, space))
        e = sp.entries.get(id_) if sp is not None else None
        return (sp, e) if sp is not None and e is not None else None

    def _insert(self, sp: _Space, e: _Entry) -> None:
        sp.entries[e.id] = e
        self._count(sp, e, 1)
        self._push(sp, e)

    def _remove(self, sp: _Space, e: _Entry) -> None:
        if sp.entries.pop(e.id, None) is not None:
            self._count(sp, e, -1)
            self._tidy(sp)

    def _push(self, sp: _Space, e: _Entry) -> None:
        """Put ``e`` at its current rank in its space's victim order (an access or insert)."""
        if not e.pinned:
            heapq.heappush(sp.order, (*lruk.rank(e.accesses, self.cfg.lru_k), e.id))
            self._tidy(sp)

    def _tidy(self, sp: _Space) -> None:
        """Drop the stale items of a space's order once they are half as many as the
        entries: a rebuild follows a third as many pushes or removals as it costs, and the
        order never holds more than one and a half items per entry (which the entry's
        overhead counts)."""
        if len(sp.order) > len(sp.entries) * 3 // 2 + 8:
            self._reorder(sp)

    def _reorder(self, sp: _Space) -> None:
        k = self.cfg.lru_k
        sp.order = [(*lruk.rank(e.accesses, k), i) for i, e in sp.entries.items() if not e.pinned]
        heapq.heapify(sp.order)

    def _count(self, sp: _Space, e: _Entry, sign: int) -> None:
        """Add (``sign`` 1) or take off (-1) what ``e`` costs, everywhere it is counted."""
        cost = sign * e.cost
        held = self._held[sp.uid]
        sp.bytes += cost
        held.bytes += cost
        self._total += cost
        if e.pinned:
            held.pinned += cost
            self._pinned += cost

    async def _space(self, uid: int, space: str) -> _Space:
        """The space in RAM, made if needed (ids continue after those in storage).

        A user holds at most ``max_spaces_per_user`` spaces; to make a new one, the user's
        spaces with no entry in RAM are forgotten first (they hold nothing but their next
        id, which then continues after the ids in storage).  QuotaExceeded if that is not
        enough.
        """
        sp = self._spaces.get((uid, space))
        if sp is not None:
            return sp
        held = self._held.get(uid)
        limit = self.cfg.max_spaces_per_user
        if held is not None and len(held.spaces) >= limit:
            for empty in [o for o in held.spaces.values() if not o.entries]:
                self._drop(empty)
            held = self._held.get(uid)
            if held is not None and len(held.spaces) >= limit:
                raise _too_many_spaces(limit, len(held.spaces) + 1)
        coll = collection_of(space)
        top = await self.storage.run_existing(uid, lambda s: _max_id(s, coll), 0)
        sp = self._spaces.get((uid, space))  # under the user's lock: nobody else made it
        if sp is None:
            sp = self._spaces[(uid, space)] = _Space(uid, space, top + 1)
            held = self._held.setdefault(uid, _Held())
            held.spaces[space] = sp
            held.bytes += space_cost(space)
            self._total += space_cost(space)
        return sp

    def _forget_if_new(self, sp: _Space, created: bool) -> None:
        """Undo making a space: a refused write leaves nothing behind."""
        if created and not sp.entries:
            self._drop(sp)

    def _drop(self, sp: _Space) -> None:
        """Forget a space that holds no entry in RAM."""
        assert not sp.entries
        if self._spaces.get((sp.uid, sp.name)) is not sp:
            return
        del self._spaces[(sp.uid, sp.name)]
        held = self._held[sp.uid]
        del held.spaces[sp.name]
        held.bytes -= space_cost(sp.name)
        self._total -= space_cost(sp.name)
        if not held.spaces:
            del self._held[sp.uid]

    async def _fetch(self, uid: int, space: str, id_: int) -> _Entry:
        """An evicted entry, read from storage (where it stays until the caller unstores it)."""
        coll = collection_of(space)
        row = await self.storage.run_existing(uid, lambda s: _load(s, coll, id_), None)
        if row is None:
            raise _not_found(space, id_)
        e = _Entry.stored(id_, row)
        if e.accesses:
            # Access times from an earlier run of the daemon must not lie in the future.
            self._clock = max(self._clock, e.accesses[-1])
        return e

    async def _move_to_storage(self, sp: _Space, e: _Entry, failure: str) -> bool:
        """Store ``e`` and drop it from RAM; if storage refuses, log ``failure`` and keep it."""
        try:
            await self._store(sp, e)
        except AiosError as exc:
            log.warning("memory: " + failure + ": %s", e.id, sp.uid, sp.name, exc.message)
            return False
        self._remove(sp, e)
        return True

    async def _store(self, sp: _Space, e: _Entry) -> None:
        coll, key, value, meta = collection_of(sp.name), str(e.id), e.content, e.metadata()
        await self.storage.run(sp.uid, lambda s: s.put(coll, key, value, True, meta))

    async def _unstore(self, uid: int, space: str, id_: int) -> bool:
        """Purge an entry from storage; False if it is not there (or there is no store)."""
        coll = collection_of(space)

        def fn(s: UserStore) -> bool:
            try:
                s.purge(coll, str(id_))
            except NotFound:
                return False
            return True

        return await self.storage.run_existing(uid, fn, False)

    def _check_pinned(self, uid: int, admin: bool) -> None:
        """Refuse a write that made pinned bytes grow beyond a pinned budget.

        Pinned entries are never evicted, so their bytes are bounded when written: per user
        (``max_pinned_bytes_per_user``) and for everyone together (:meth:`pinned_budget`).
        Administrators may go beyond the latter by ``max_pinned_bytes_per_user``: users who
        filled it cannot keep an administrator from pinning.
        """
        cfg = self.cfg
        mine = self._held[uid].pinned
        if mine > cfg.max_pinned_bytes_per_user:
            raise _pinned_refused(
                "memory.max_pinned_bytes_per_user", cfg.max_pinned_bytes_per_user, mine
            )
        limit = self.pinned_budget() + (cfg.max_pinned_bytes_per_user if admin else 0)
        if self._pinned > limit:
            raise _pinned_refused("memory.pinned_budget_bytes", limit, self._pinned)

    def _plan(self, sp: _Space, keep: _Entry, call: _Call) -> list[_Victim]:
        """The victims that bring every budget back within limits; QuotaExceeded if none do.

        Every user's unpinned entries are candidates, whatever calls are under way, except
        those of users whose storage refused a victim of this write; ``keep`` (the entry
        being written) is never chosen.  An entry on its way to storage counts until it is
        out.  Nothing is changed.
        """
        cfg, k = self.cfg, self.cfg.lru_k
        uid, out_of_reach = sp.uid, call.unstorable
        budget = self._budgets.get((uid, sp.name))
        held = self._held[uid]

        def of(owner: int) -> Iterator[lruk.Candidate[_Ref]]:
            if owner in out_of_reach:
                return iter(())
            return _merged(self._held[owner].spaces.values(), k)

        # Other owners matter only if the daemon budget is exceeded (victims only lower it).
        over = self._total > cfg.budget_bytes
        others = {o: of(o) for o in self._held if o != uid} if over else {}
        out = lruk.plan(
            lruk.Usage(
                uid,
                len(sp.entries),
                sp.bytes,
                held.bytes,
                self._total,
                {o: h.bytes for o, h in self._held.items()} if over else {},
            ),
            iter(()) if uid in out_of_reach else _candidates(sp, k),
            of(uid),
            others,
            k=k,
            limits=lruk.Limits(
                cfg.max_entries_per_space,
                min(cfg.max_bytes_per_space, budget or cfg.max_bytes_per_space),
                cfg.max_bytes_per_user,
                cfg.budget_bytes,
            ),
            keep={_ref(sp, keep)},
        )
        if isinstance(out, lruk.Refusal):
            name = "memory." + out.limit
            if budget and out.limit == "max_bytes_per_space" and budget < cfg.max_bytes_per_space:
                name = "agent memory_budget"
            raise _refused(name, out.value, out.needed, bool(out_of_reach))
        victims = []
        for c in out:
            owner, name, id_ = c.key
            vsp = self._spaces[(owner, name)]
            e = vsp.entries[id_]
            victims.append(_Victim(vsp, e, e.accesses))
        return victims

    def _unchanged(self, v: _Victim) -> bool:
        """Whether ``v`` is still the victim it was planned as (in RAM, unpinned, not used)."""
        sp, e = v.sp, v.entry
        return (
            self._spaces.get((sp.uid, sp.name)) is sp
            and sp.entries.get(e.id) is e
            and not e.pinned
            and e.accesses == v.accesses
        )

    async def _make_room(self, sp: _Space, keep: _Entry, call: _Call, pins: bool) -> None:
        """Evict until every budget holds, adding the moved entries to ``call.evicted``.

        ``pins``: the write made the pinned bytes grow, so the pinned budgets are checked
        first (:meth:`_check_pinned`).  Refuses, evicting nothing more, when no choice of
        victims would do (only pinned entries could make room).  Raises :class:`_Busy`,
        moving nothing more, when victims belong to users whose calls are under way and
        whose locks ``call`` does not hold.  Victims move owner by owner, other users' first,
        and each other owner's lock is held only until its own victims are out.  When an
        owner's storage refuses an entry (e.g. a full storage quota), it stays in RAM and
        victims are planned again from other owners.
        """
        if pins:
            self._check_pinned(sp.uid, call.admin)
        while True:
            victims = self._plan(sp, keep, call)
            groups: dict[int, list[_Victim]] = {}
            for v in victims:
                groups.setdefault(v.sp.uid, []).append(v)
            busy = {u for u in groups if u not in call.held and not self._free(u)}
            if busy:
                raise _Busy(busy, self._total)
            for u in call.held - groups.keys() - {call.uid}:
                self._let_go(call, u)  # taken for an earlier plan, not needed by this one
            if not groups:
                return
            # Owners already waiting for us first; our own user's calls wait for us anyway.
            order = sorted(groups, key=lambda u: (u == call.uid, u not in call.held))
            spoiled: set[int] = set()
            failed = False
            for u in order:
                # Free at planning, but a call of its owner may have begun while earlier
                # victims moved: then plan again rather than move entries under that call.
                if u not in call.held:
                    if not self._try_lock(u):
                        spoiled.add(u)
                        continue
                    call.held.add(u)
                try:
                    for v in groups[u]:
                        if not self._unchanged(v):
                            spoiled.add(u)
                        elif await self._move_to_storage(
                            v.sp, v.entry, "could not evict entry %d of uid %d space %r"
                        ):
                            call.evicted.append(_ref(v.sp, v.entry))
                        else:
                            call.unstorable.add(u)
                            failed = True
                            break
                finally:
                    if u != call.uid:
                        self._let_go(call, u)
            if spoiled:
                call.contended(spoiled, self._total, self.cfg.budget_bytes)
            elif not failed:
                return


def _not_found(space: str, id_: int) -> NotFound:
    return NotFound(f"no memory entry {id_} in space {space!r}")


def _refused(limit: str, value: int, needed: int, unstorable: bool = False) -> QuotaExceeded:
    why = (
        "the entries that could be evicted could not be moved to their owners' storage "
        "(a full storage quota?): free some storage, or unpin or delete some entries"
        if unstorable
        else "no entry can be evicted (only pinned entries are left): unpin or delete some entries"
    )
    return QuotaExceeded(
        f"memory limit {limit} ({value}) would be exceeded ({needed}) and {why}",
        data={"limit": limit, "value": value, "needed": needed},
    )


def _pinned_refused(limit: str, value: int, needed: int) -> QuotaExceeded:
    return QuotaExceeded(
        f"memory limit {limit} ({value}) would be exceeded ({needed}): pinned entries are "
        "never evicted, so they are bounded; unpin or delete some pinned entries, or keep "
        "this one unpinned",
        data={"limit": limit, "value": value, "needed": needed},
    )


def _too_many_spaces(limit: int, needed: int) -> QuotaExceeded:
    name = "memory.max_spaces_per_user"
    return QuotaExceeded(
        f"memory limit {name} ({limit}) would be exceeded ({needed}): every one of your "
        "spaces holds entries in RAM; clear (memory.clear) or evict some spaces' entries, "
        "or use a space you already have",
        data={"limit": name, "value": limit, "needed": needed},
    )


def _contended(budget: int, needed: int) -> QuotaExceeded:
    limit = "memory.budget_bytes"
    return QuotaExceeded(
        f"memory limit {limit} ({budget}) would be exceeded ({needed}) and other users' "
        "memory calls kept taking the entries that could be evicted: try again",
        data={"limit": limit, "value": budget, "needed": needed},
    )

"""The ``memory.*`` syscalls: short-term memory, by default the caller's agent's or session's.

Every bound of short-term memory is the memory manager's (docs/storage.md, "Memory"); a write
beyond one is refused with QuotaExceeded naming the setting.  Administrators are told apart
here, for the one bound that keeps them a reserve: the pinned budget.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, model_validator

from aiosd.kernel.agents import agent_space
from aiosd.kernel.syscall_base import Emit, Params, Result, syscall
from aiosd.managers.access import AccessManager, Caller, Permission, Role
from aiosd.managers.memory import MemoryManager

Space = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")]
EntryId = Annotated[int, Field(ge=1, le=2**63 - 1)]
Content = Annotated[str, Field(max_length=64 * 1024 * 1024)]
Tags = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=32)]


class AddParams(Params):
    """Parameters of ``memory.add``."""

    content: Content
    tags: Tags | None = None
    pinned: bool = False
    space: Space | None = None


class EntryResult(Result):
    """Result of ``memory.add``, ``memory.get`` and ``memory.update``.

    ``evicted``: ids of this space's entries moved to storage to make room.
    """

    space: str
    id: int
    content: str
    tags: list[str]
    pinned: bool
    created: float
    updated: float
    size: int
    evicted: list[int]


class IdParams(Params):
    """An entry of a space (``memory.get``, ``memory.delete``)."""

    id: EntryId
    space: Space | None = None


class SearchParams(Params):
    """Parameters of ``memory.search``."""

    query: Annotated[str, Field(min_length=1, max_length=1024)]
    space: Space | None = None
    limit: Annotated[int, Field(ge=1, le=100)] = 10


class Hit(BaseModel):
    """One search hit; ``evicted`` entries were found in storage."""

    id: int
    content: str
    tags: list[str]
    pinned: bool
    created: float
    updated: float
    size: int
    score: float
    evicted: bool


class SearchResult(Result):
    """Result of ``memory.search``: best first."""

    space: str
    hits: list[Hit]


class UpdateParams(Params):
    """Parameters of ``memory.update``: at least one of content, tags and pinned."""

    id: EntryId
    content: Content | None = None
    tags: Tags | None = None
    pinned: bool | None = None
    space: Space | None = None

    @model_validator(mode="after")
    def _changes_something(self) -> UpdateParams:
        if self.content is None and self.tags is None and self.pinned is None:
            raise ValueError("give at least one of content, tags and pinned")
        return self


class DeleteResult(Result):
    """Result of ``memory.delete``."""

    space: str
    id: int
    deleted: bool


class ClearParams(Params):
    """Parameters of ``memory.clear``."""

    space: Space | None = None
    keep_pinned: bool = True


class ClearResult(Result):
    """Result of ``memory.clear``: how many entries were removed (RAM and storage)."""

    space: str
    removed: int


# --- handlers --------------------------------------------------------------------------------


def _space(space: str | None, c: Caller) -> str:
    """The space named, else the caller's agent's, else its session's, else ``default``."""
    if space:
        return space
    if c.aid is not None:
        return agent_space(c.aid)
    return c.session or "default"


class MemorySyscalls:
    """Handlers of ``memory.*``: the memory manager, and the access manager to tell
    administrators apart (without it, nobody is one)."""

    def __init__(self, memory: MemoryManager, access: AccessManager | None = None) -> None:
        self.memory = memory
        self.access = access

    def _admin(self, c: Caller) -> bool:
        return self.access is not None and self.access.role(c) is Role.admin

    @syscall(
        "memory.add",
        AddParams,
        EntryResult,
        Permission.user,
        "Remember something in a memory space (by default your session's).",
    )
    async def add(self, p: AddParams, c: Caller, emit: Emit | None) -> Result:
        """``memory.add``."""
        space = _space(p.space, c)
        out = await self.memory.add(
            c.uid, space, p.content, list(p.tags or []), p.pinned, admin=self._admin(c)
        )
        return EntryResult(space=space, **out)

    @syscall(
        "memory.get",
        IdParams,
        EntryResult,
        Permission.user,
        "Read a memory entry; an evicted one is brought back from storage.",
    )
    async def get(self, p: IdParams, c: Caller, emit: Emit | None) -> Result:
        """``memory.get``."""
        space = _space(p.space, c)
        out = await self.memory.get(c.uid, space, p.id, admin=self._admin(c))
        return EntryResult(space=space, **out)

    @syscall(
        "memory.search",
        SearchParams,
        SearchResult,
        Permission.user,
        "Keyword search of a memory space, evicted entries included, best first.",
    )
    async def search(self, p: SearchParams, c: Caller, emit: Emit | None) -> Result:
        """``memory.search``."""
        space = _space(p.space, c)
        hits = await self.memory.search(c.uid, space, p.query, p.limit)
        return SearchResult(space=space, hits=[Hit(**h) for h in hits])

    @syscall(
        "memory.update",
        UpdateParams,
        EntryResult,
        Permission.user,
        "Change a memory entry's content, tags or pinning.",
    )
    async def update(self, p: UpdateParams, c: Caller, emit: Emit | None) -> Result:
        """``memory.update``."""
        space = _space(p.space, c)
        tags = list(p.tags) if p.tags is not None else None
        out = await self.memory.update(
            c.uid, space, p.id, p.content, tags, p.pinned, admin=self._admin(c)
        )
        return EntryResult(space=space, **out)

    @syscall(
        "memory.delete",
        IdParams,
        DeleteResult,
        Permission.user,
        "Delete a memory entry (from RAM or storage).",
    )
    async def delete(self, p: IdParams, c: Caller, emit: Emit | None) -> Result:
        """``memory.delete``."""
        space = _space(p.space, c)
        await self.memory.delete(c.uid, space, p.id)
        return DeleteResult(space=space, id=p.id, deleted=True)

    @syscall(
        "memory.clear",
        ClearParams,
        ClearResult,
        Permission.user,
        "Empty a memory space (pinned entries stay unless keep_pinned is false).",
    )
    async def clear(self, p: ClearParams, c: Caller, emit: Emit | None) -> Result:
        """``memory.clear``."""
        space = _space(p.space, c)
        removed = await self.memory.clear(c.uid, space, p.keep_pinned)
        return ClearResult(space=space, removed=removed)

"""Context manager: conversations kept in memory and fitted to a model's context window.

A chat with a ``session`` name keeps its turns in the caller's memory (space
``chat.<session>``), one entry per turn.  Each call replays them before the new messages.
When the whole no longer fits the model's context (leaving room for the answer), the oldest
turns are moved to storage — where ``memory.search`` still finds them — and the result says
how many.  Nothing is dropped silently.  (Snapshot/restore of generations comes later.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from aiosd.errors import ContextTooLong

if TYPE_CHECKING:
    from aiosd.managers.memory import MemoryEntry, MemoryManager

TURN_TAG = "turn"

#: What the caller's ``prepare`` makes of the fitted messages (a backend's prepared request).
P = TypeVar("P")


def session_space(session: str) -> str:
    """The memory space that holds a chat session's turns."""
    return f"chat.{session}"


@dataclass
class Fitted(Generic[P]):
    """A session's messages, fitted to the context."""

    prepared: P
    replayed: int
    moved: int
    notes: list[str] = field(default_factory=list)


class ContextManager:
    """Replays and fits chat sessions; records their new turns."""

    def __init__(self, memory: MemoryManager) -> None:
        self.memory = memory

    async def fit(
        self,
        uid: int,
        session: str,
        messages: list[dict[str, Any]],
        prepare: Callable[[list[dict[str, Any]]], Awaitable[P]],
    ) -> Fitted[P]:
        """Prepend the session's turns; move the oldest to storage until the prompt fits."""
        space = session_space(session)
        turns = [e for e in await self.memory.entries(uid, space) if TURN_TAG in e["tags"]]
        system = [m for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"]
        moved: list[int] = []
        while True:
            history = [{"role": _role(t), "content": t["content"]} for t in turns]
            try:
                prepared = await prepare(system + history + rest)
                break
            except ContextTooLong:
                if not turns:
                    raise
                moved.append(turns.pop(0)["id"])
        if moved:
            await self.memory.evict(uid, space, moved)
        notes = []
        if moved:
            notes.append(
                f"{len(moved)} older turn(s) of session {session!r} no longer fit the "
                f"context and were moved to storage (memory.search with space {space!r} "
                "finds them)"
            )
        return Fitted(prepared=prepared, replayed=len(turns), moved=len(moved), notes=notes)

    async def record(
        self, uid: int, session: str, messages: list[dict[str, Any]], reply: str
    ) -> None:
        """Keep the new user turns and the assistant's reply in the session."""
        space = session_space(session)
        for m in messages:
            if m["role"] in ("user", "assistant", "tool"):
                await self.memory.add(
                    uid, space, m["content"], [TURN_TAG, f"role:{m['role']}"], False
                )
        await self.memory.add(uid, space, reply, [TURN_TAG, "role:assistant"], False)


def _role(entry: MemoryEntry) -> str:
    for tag in entry["tags"]:
        if tag.startswith("role:"):
            return tag[5:]
    return "user"

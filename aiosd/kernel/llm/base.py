"""The backend protocol every LLM backend implements."""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ChatRequest:
    """One generation, as the scheduler hands it to a backend.

    ``messages`` are dicts with ``role`` and ``content`` (and, for tool use, ``tool_calls``
    or ``tool_name``), in the shape of the ``llm.chat`` syscall.
    """

    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float = 0.0
    seed: int | None = None
    response_schema: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    #: With tools: "auto" (a call or an answer), "none" (an answer: no call).
    tool_choice: str = "auto"
    #: Tokens the prompt must leave free for the answer (0: refuse only a prompt that alone
    #: does not fit).  Chat sessions use it to fit their history.
    reserve: int = 0


@dataclass
class ChatChunk:
    """A piece of a streamed answer; the last one has ``done`` set and the counts filled."""

    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """What ``llm.models`` reports of one configured model."""

    name: str
    backend: str
    slots: int
    context_length: int | None
    detail: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    """A configured model: loads or connects on ``start``, generates on ``chat``.

    ``prepare`` runs before the request queues (so a prompt that cannot fit is refused at
    once); ``chat`` receives what it returned and is called by the scheduler with a slot
    index in ``range(slots)``; the scheduler guarantees that no two generations use the same
    slot at once.  Cancelling the iterator (closing it, or cancelling the task that drives it)
    must stop the generation promptly and release everything the slot holds before
    ``aclose`` returns.
    """

    def __init__(self, name: str, slots: int) -> None:
        self.name = name
        self.slots = slots

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model or check the server; raise AiosError if it cannot be used."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release everything; called once at shutdown."""

    @abc.abstractmethod
    def info(self) -> ModelInfo:
        """Describe the model for ``llm.models`` and ``system.status``."""

    async def prepare(self, request: ChatRequest) -> Any:
        """Check and convert a request before it queues; errors here cost no slot."""
        return request

    @abc.abstractmethod
    def chat(self, request: Any, slot: int) -> AsyncGenerator[ChatChunk, None]:
        """Generate an answer to a prepared request, yielding chunks; the last has ``done``."""

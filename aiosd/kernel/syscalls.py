"""THE syscall table: every syscall's name, parameter model, result model, permission and handler.

Both transports and ``aiosctl``'s help are generated from :data:`SYSCALLS`; nothing else
declares a syscall.  Handlers are thin: they route to the scheduler or to a manager.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aiosd.kernel.families import memory as _memory
from aiosd.kernel.families import storage as _storage
from aiosd.kernel.scheduler import Priority
from aiosd.kernel.syscall_base import (
    MAX_TEXT,
    Emit,
    Name,
    NoParams,
    Params,
    Result,
    Syscall,
)
from aiosd.managers.access import Caller, Permission

if TYPE_CHECKING:
    from aiosd.kernel.kernel import Kernel

# --- llm -------------------------------------------------------------------------------------


class ToolCall(BaseModel):
    """A tool the model asked to call."""

    model_config = ConfigDict(extra="forbid")
    name: Name
    arguments: dict[str, Any] = Field(default_factory=dict)


class Message(BaseModel):
    """One chat turn."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=MAX_TEXT)] = ""
    tool_calls: list[ToolCall] | None = None
    tool_name: Name | None = None


class FunctionSpec(BaseModel):
    """A callable tool's name, description and JSON-schema parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Name
    description: Annotated[str, Field(max_length=4096)] = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolSpec(BaseModel):
    """A tool offered to the model (OpenAI/Ollama shape)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["function"] = "function"
    function: FunctionSpec


class ChatParams(Params):
    """Parameters of ``llm.chat``."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=10000)]
    model: Name | None = None
    max_tokens: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=5.0)] = 0.0
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    priority: Priority = Priority.normal
    stream: bool = False
    response_schema: dict[str, Any] | None = None
    tools: Annotated[list[ToolSpec], Field(max_length=128)] | None = None
    session: (
        Annotated[str, Field(min_length=1, max_length=58, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
        | None
    ) = None


class SessionInfo(BaseModel):
    """What a chat session contributed: turns replayed, and turns moved out to storage."""

    name: str
    replayed: int
    moved: int


class Usage(BaseModel):
    """Token counts of one generation."""

    prompt_tokens: int
    completion_tokens: int


class Timings(BaseModel):
    """Where the time of one request went, in milliseconds."""

    queued_ms: float
    first_token_ms: float | None
    total_ms: float


class ChatResult(Result):
    """Result of ``llm.chat``."""

    request_id: int
    model: str
    message: Message
    finish_reason: str | None
    usage: Usage
    timings: Timings
    session: SessionInfo | None = None
    notes: list[str] = Field(default_factory=list)


class ModelEntry(BaseModel):
    """One configured model."""

    name: str
    backend: str
    slots: int
    context_length: int | None
    default: bool
    detail: dict[str, Any]


class ModelsResult(Result):
    """Result of ``llm.models``."""

    default: str
    models: list[ModelEntry]


# --- system ----------------------------------------------------------------------------------


class QueueModel(BaseModel):
    """One model's queue."""

    model: str
    slots: int
    served: int
    running: list[dict[str, Any]]
    waiting: list[dict[str, Any]]


class QueueResult(Result):
    """Result of ``system.queue``: running and waiting requests per model."""

    models: list[QueueModel]


class StatusResult(Result):
    """Result of ``system.status``."""

    version: str
    pid: int
    uptime_s: float
    state: Literal["starting", "running", "reloading", "stopping"]
    models: list[str]
    default_model: str
    running: int
    waiting: int
    connections: int
    caller_uid: int
    caller_role: str


# --- the table -------------------------------------------------------------------------------


async def _llm_chat(k: Kernel, p: ChatParams, c: Caller, emit: Emit | None) -> Result:
    return await k.llm_chat(p, c, emit if p.stream else None)


def _llm_models(k: Kernel, p: NoParams, c: Caller, emit: Emit | None) -> Result:
    return k.llm_models()


def _system_status(k: Kernel, p: NoParams, c: Caller, emit: Emit | None) -> Result:
    return k.system_status(c)


def _system_queue(k: Kernel, p: NoParams, c: Caller, emit: Emit | None) -> Result:
    return k.system_queue()


SYSCALLS: dict[str, Syscall] = {
    s.name: s
    for s in (
        Syscall(
            "llm.chat",
            ChatParams,
            ChatResult,
            Permission.user,
            _llm_chat,
            "Generate a chat answer; with stream=true, tokens arrive as notifications.",
            streams=True,
        ),
        Syscall(
            "llm.models",
            NoParams,
            ModelsResult,
            Permission.user,
            _llm_models,
            "List the configured models.",
        ),
        Syscall(
            "system.status",
            NoParams,
            StatusResult,
            Permission.user,
            _system_status,
            "Version, uptime, models and queue totals.",
        ),
        Syscall(
            "system.queue",
            NoParams,
            QueueResult,
            Permission.user,
            _system_queue,
            "Running and waiting LLM requests per model, in queue order.",
        ),
        *_storage.SYSCALLS,
        *_memory.SYSCALLS,
    )
}

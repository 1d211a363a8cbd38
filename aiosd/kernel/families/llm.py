"""The ``llm.*`` syscalls, and the chat service that owns a generation's whole flow."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from aiosd.errors import AiosError, Cancelled, NotSupported
from aiosd.kernel.agents import AgentManager
from aiosd.kernel.llm.base import ChatRequest
from aiosd.kernel.llm.registry import Models
from aiosd.kernel.scheduler import Priority, Scheduler
from aiosd.kernel.syscall_base import MAX_TEXT, Emit, Name, NoParams, Params, Result, syscall
from aiosd.managers.access import Caller, Permission
from aiosd.managers.context import ContextManager


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
    #: Run the tool loop in the daemon with these tools of the tool manager (names or globs
    #: such as ``fs.*``; ``["*"]``: every tool you may use).
    use_tools: (
        Annotated[
            list[
                Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.*\-]+$")]
            ],
            Field(min_length=1, max_length=128),
        ]
        | None
    ) = None
    #: Model replies the tool loop asks for at most; the last must be an answer.
    max_steps: Annotated[int, Field(ge=1, le=32)] = 8
    #: With tools: "auto" (the model calls a tool or answers), "none" (it must answer).
    tool_choice: Literal["auto", "none"] = "auto"
    session: (
        Annotated[str, Field(min_length=1, max_length=58, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
        | None
    ) = None

    @model_validator(mode="after")
    def _one_way_of_tools(self) -> ChatParams:
        if self.use_tools is not None and self.tools is not None:
            raise ValueError(
                "give tools (you run the calls the model makes) or use_tools (the daemon "
                "runs them), not both"
            )
        if self.use_tools is not None and self.session is not None:
            raise ValueError("use_tools cannot go with session yet: run the loop without one")
        if self.use_tools is not None and self.response_schema is not None:
            raise ValueError("use_tools cannot go with response_schema")
        return self


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


class Step(BaseModel):
    """One step of the tool loop: a call the model made, and what running it gave."""

    model_config = ConfigDict(extra="forbid")
    #: The model reply (0, 1, ...) that made the call.
    reply: int
    tool: str
    arguments: dict[str, Any]
    ok: bool
    output: dict[str, Any] | None = None
    #: Why it gave no output: the tool failed (kind, message, ...), or the daemon refused
    #: the call (kind "refused": an unknown tool, bad arguments, no consent).
    error: dict[str, Any] | None = None
    elapsed_ms: float


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
    #: The tool loop's trace (with use_tools): every call, in order.
    steps: list[Step] | None = None


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


class ChatService:
    """One generation from request to result: fit the session, queue, run on a slot, stream."""

    def __init__(
        self,
        models: Models,
        scheduler: Scheduler,
        context: ContextManager,
        agents: AgentManager | None = None,
    ) -> None:
        self.models = models
        self.scheduler = scheduler
        self.context = context
        #: An agent's requests are queued at most at its class, and its tokens counted.
        self.agents = agents
        #: One prompt preparation (tokenizing) in flight per user: the tokenizer's thread
        #: then holds at most one job of each user, so users take turns at it.
        self._preparing: dict[int, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def _turn_to_prepare(self, uid: int) -> AsyncIterator[None]:
        lock, users = self._preparing.setdefault(uid, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._preparing[uid]

    async def chat(self, p: ChatParams, caller: Caller, emit: Emit | None) -> ChatResult:
        """Queue a generation on the scheduler, run it on a slot, stream or collect it."""
        backend = self.models.get(p.model)
        messages = [m.model_dump(exclude_none=True) for m in p.messages]
        tools = [t.model_dump() for t in p.tools] if p.tools else None

        def request(msgs: list[dict[str, Any]], reserve: int = 0) -> ChatRequest:
            return ChatRequest(
                messages=msgs,
                max_tokens=p.max_tokens,
                temperature=p.temperature,
                seed=p.seed,
                response_schema=p.response_schema,
                tools=tools,
                tool_choice=p.tool_choice,
                reserve=reserve,
            )

        session = None
        notes: list[str] = []
        if p.session is not None:
            # Room for the answer: the requested length, at most a quarter of the context.
            ctx = backend.info().context_length or 0
            reserve = min(p.max_tokens or ctx, ctx // 4)
            async with self._turn_to_prepare(caller.uid):
                fitted = await self.context.fit(
                    caller.uid,
                    p.session,
                    messages,
                    lambda msgs: backend.prepare(request(msgs, reserve)),
                )
            prepared = fitted.prepared
            notes = fitted.notes
            session = SessionInfo(name=p.session, replayed=fitted.replayed, moved=fitted.moved)
        else:
            async with self._turn_to_prepare(caller.uid):
                prepared = await backend.prepare(request(messages))
        t0 = time.monotonic()
        parts: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        first_token: float | None = None
        final = None
        priority = p.priority
        agent = self.agents.agent_of(caller.aid) if self.agents is not None else None
        if agent is not None and Priority(agent.priority).rank > priority.rank:
            priority = Priority(agent.priority)
        async with self.scheduler.slot(backend.name, caller.uid, caller.pid, priority) as ticket:
            started = time.monotonic()
            seq = 0
            async with contextlib.aclosing(backend.chat(prepared, ticket.slot or 0)) as chunks:
                async for chunk in chunks:
                    if chunk.done:
                        final = chunk
                    if first_token is None and (chunk.content or chunk.tool_calls):
                        first_token = time.monotonic()
                    parts.append(chunk.content)
                    tool_calls.extend(chunk.tool_calls)
                    if emit is not None and (chunk.content or chunk.tool_calls):
                        note: dict[str, Any] = {"seq": seq, "content": chunk.content}
                        if chunk.tool_calls:
                            note["tool_calls"] = chunk.tool_calls
                        await emit(note)
                        seq += 1
                    if chunk.done:
                        break
        if final is None:
            raise Cancelled(f"the generation on model {backend.name!r} ended without finishing")
        content = "".join(parts)
        if agent is not None and self.agents is not None:
            self.agents.count_tokens(agent.aid, final.prompt_tokens, final.completion_tokens)
        if p.session is not None:
            try:
                await self.context.record(caller.uid, p.session, messages, content)
            except AiosError as exc:
                # The answer exists and may have been streamed: report, do not fail the call.
                notes.append(f"this exchange was not kept in session {p.session!r}: {exc.message}")
        end = time.monotonic()
        return ChatResult(
            request_id=ticket.id,
            model=backend.name,
            message=Message(
                role="assistant",
                content=content,
                tool_calls=[ToolCall(**c) for c in tool_calls] or None,
            ),
            finish_reason=final.finish_reason,
            usage=Usage(
                prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens
            ),
            timings=Timings(
                queued_ms=round((started - t0) * 1000, 2),
                first_token_ms=round((first_token - t0) * 1000, 2) if first_token else None,
                total_ms=round((end - t0) * 1000, 2),
            ),
            session=session,
            notes=notes,
        )


class LlmSyscalls:
    """Handlers of ``llm.*``: they need the chat service and the model registry only."""

    def __init__(
        self,
        chat: ChatService,
        models: Models,
        tool_loop: Callable[[ChatParams, Caller, Emit | None], Awaitable[ChatResult]] | None = None,
    ) -> None:
        self.chat_service = chat
        self.models = models
        #: Runs llm.chat with use_tools (kernel/toolloop.py).
        self.tool_loop = tool_loop

    @syscall(
        "llm.chat",
        ChatParams,
        ChatResult,
        Permission.user,
        "Generate a chat answer; with stream=true, tokens arrive as notifications.",
        streams=True,
    )
    async def chat(self, p: ChatParams, c: Caller, emit: Emit | None) -> Result:
        """``llm.chat``."""
        if p.use_tools is not None:
            if self.tool_loop is None:
                raise NotSupported("this daemon runs no tool loop (no tool manager)")
            return await self.tool_loop(p, c, emit if p.stream else None)
        return await self.chat_service.chat(p, c, emit if p.stream else None)

    @syscall("llm.models", NoParams, ModelsResult, Permission.user, "List the configured models.")
    def list_models(self, p: NoParams, c: Caller, emit: Emit | None) -> Result:
        """``llm.models``: every configured model."""
        entries = []
        for name, backend in self.models.backends.items():
            info = backend.info()
            entries.append(
                ModelEntry(
                    name=name,
                    backend=info.backend,
                    slots=info.slots,
                    context_length=info.context_length,
                    default=name == self.models.default,
                    detail=info.detail,
                )
            )
        return ModelsResult(default=self.models.default, models=entries)

"""The kernel: owns the managers, the scheduler and the models; runs with no front-end at all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from aiosd import __version__
from aiosd.config import Config, LlamaCppModelConfig, OllamaModelConfig
from aiosd.errors import AiosError, Cancelled, ModelNotFound, ShuttingDown
from aiosd.kernel import dispatch as _dispatch
from aiosd.kernel.llm.base import Backend, ChatRequest
from aiosd.kernel.scheduler import Scheduler
from aiosd.kernel.syscall_base import Emit
from aiosd.kernel.syscalls import (
    ChatParams,
    ChatResult,
    Message,
    ModelEntry,
    ModelsResult,
    QueueModel,
    QueueResult,
    SessionInfo,
    StatusResult,
    Timings,
    ToolCall,
    Usage,
)
from aiosd.managers.access import AccessManager, Caller
from aiosd.managers.context import ContextManager
from aiosd.managers.memory import MemoryManager
from aiosd.managers.storage import Limits, StorageManager

log = logging.getLogger(__name__)

State = Literal["starting", "running", "reloading", "stopping"]


def build_backend(name: str, cfg: LlamaCppModelConfig | OllamaModelConfig) -> Backend:
    """Create the backend a model's config asks for (imported lazily: each pulls a library)."""
    if isinstance(cfg, LlamaCppModelConfig):
        from aiosd.kernel.llm.llamacpp import LlamaCppBackend

        return LlamaCppBackend(name, cfg)
    from aiosd.kernel.llm.ollama import OllamaBackend

    return OllamaBackend(name, cfg)


class Kernel:
    """Everything the daemon does, reachable through :meth:`dispatch`."""

    def __init__(self, config: Config, *, backends: dict[str, Backend] | None = None) -> None:
        self.config = config
        self.access = AccessManager(config.access)
        self.scheduler = Scheduler(config.scheduler.queue_size, on_change=self.changed)
        #: Called (on the event loop) whenever the state, queue or models change.
        self.listeners: list[Callable[[], None]] = []
        self.backends: dict[str, Backend] = (
            backends
            if backends is not None
            else {name: build_backend(name, m) for name, m in config.llm.models.items()}
        )
        st = config.storage
        self.storage = StorageManager(
            config.state_dir() / "storage",
            st.durability,
            Limits(st.quota_bytes, st.quota_entries, st.retention),
        )
        self.memory = MemoryManager(self.storage, config.memory)
        #: The context manager (chat sessions), built on the memory manager.
        self.context = ContextManager(self.memory)
        self.state: State = "starting"
        self.started_at = time.monotonic()
        self.pid = os.getpid()  # a syscall each time otherwise; the daemon never forks
        self.connections = 0
        self._inflight: set[asyncio.Task[Any]] = set()

    # --- lifecycle ----------------------------------------------------------------------------

    def changed(self) -> None:
        """Tell the front-ends that something they show has changed."""
        for listener in list(self.listeners):
            listener()

    def _set_state(self, state: State) -> None:
        self.state = state
        self.changed()

    async def start(self) -> None:
        """Load or connect every model; the kernel is usable when this returns."""
        for name, backend in self.backends.items():
            await backend.start()
            self.scheduler.add_model(name, backend.slots)
        self._set_state("running")

    async def reload(self, config: Config) -> list[str]:
        """Apply a new config where it can be applied live; return what needs a restart."""
        self._set_state("reloading")
        try:
            needs_restart = [
                section
                for section in ("socket", "llm", "dbus")
                if getattr(config, section) != getattr(self.config, section)
            ]
            # Storage limits are read when a user's store opens; max_value_bytes applies live.
            unchanged = {"max_value_bytes": 0}
            if config.storage.model_copy(update=unchanged) != self.config.storage.model_copy(
                update=unchanged
            ):
                needs_restart.append("storage")
            if (config.daemon.state_directory, config.daemon.runtime_directory) != (
                self.config.daemon.state_directory,
                self.config.daemon.runtime_directory,
            ):
                needs_restart.append("daemon")
            self.access.configure(config.access)
            self.memory.configure(config.memory)
            self.scheduler.set_queue_size(config.scheduler.queue_size)
            self.config = config
            return needs_restart
        finally:
            self._set_state("running")

    async def stop(self, drain_timeout: float, close_timeout: float) -> None:
        """Refuse new work, let running generations finish for ``drain_timeout``, then cancel."""
        self._set_state("stopping")
        self.scheduler.close()
        pending = {t for t in self._inflight if not t.done()}
        if pending:
            log.info("waiting up to %.1fs for %d request(s) to finish", drain_timeout, len(pending))
            _, pending = await asyncio.wait(pending, timeout=drain_timeout)
        if pending:
            log.warning("cancelling %d request(s) still running", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=close_timeout)
        # Short-term memory ends with the daemon; pinned entries are kept in storage.
        await _closing(self.memory.persist_pinned, close_timeout, "keeping pinned memory failed")
        await _closing(self.storage.close, close_timeout, "closing storage failed")
        for backend in self.backends.values():
            await _closing(backend.close, close_timeout, "closing model %s failed", backend.name)

    # --- the one entry point ------------------------------------------------------------------

    def call(
        self, name: str, params: Any, caller: Caller, emit: Emit | None = None
    ) -> dict[str, Any] | asyncio.Task[dict[str, Any]]:
        """Validate, authorize, route and audit one syscall (see kernel/dispatch.py).

        Returns the result when the syscall finished without waiting; else the task that
        finishes it, already counted as in flight (a stop drains or cancels it).
        """
        if self.state == "stopping":
            raise ShuttingDown("the daemon is stopping and takes no new requests")
        out = _dispatch.dispatch(self, name, params, caller, emit)
        if isinstance(out, dict):
            return out
        task = asyncio.get_running_loop().create_task(out)
        # Counted now, not when the task first runs: a stop that begins in between sees it.
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return task

    async def dispatch(
        self, name: str, params: Any, caller: Caller, emit: Emit | None = None
    ) -> dict[str, Any]:
        """:meth:`call`, awaited."""
        out = self.call(name, params, caller, emit)
        return out if isinstance(out, dict) else await out

    # --- syscall implementations (routed here by the table) ----------------------------------

    async def session_closed(self, caller: Caller) -> None:
        """A client session ended: its short-term memory goes (pinned entries stay)."""
        if caller.session is not None and self.state != "stopping":
            await self.memory.drop_session(caller.uid, caller.session)

    def backend(self, model: str | None) -> Backend:
        """The backend of a configured model (None: the default model)."""
        name = model or self.config.llm.default_model
        backend = self.backends.get(name)
        if backend is None:
            raise ModelNotFound(
                f"no model named {name!r} is configured (configured: "
                f"{', '.join(sorted(self.backends))})",
                data={"model": name, "models": sorted(self.backends)},
            )
        return backend

    async def llm_chat(self, p: ChatParams, caller: Caller, emit: Emit | None) -> ChatResult:
        """Queue a generation on the scheduler, run it on a slot, stream or collect it."""
        backend = self.backend(p.model)
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
                reserve=reserve,
            )

        session = None
        notes: list[str] = []
        if p.session is not None:
            # Room for the answer: the requested length, at most a quarter of the context.
            ctx = backend.info().context_length or 0
            reserve = min(p.max_tokens or ctx, ctx // 4)
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
            prepared = await backend.prepare(request(messages))
        t0 = time.monotonic()
        parts: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        first_token: float | None = None
        final = None
        async with self.scheduler.slot(backend.name, caller.uid, caller.pid, p.priority) as ticket:
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

    def llm_models(self) -> ModelsResult:
        """Describe every configured model."""
        default = self.config.llm.default_model
        entries = []
        for name, backend in self.backends.items():
            info = backend.info()
            entries.append(
                ModelEntry(
                    name=name,
                    backend=info.backend,
                    slots=info.slots,
                    context_length=info.context_length,
                    default=name == default,
                    detail=info.detail,
                )
            )
        return ModelsResult(default=default, models=entries)

    def system_status(self, caller: Caller) -> StatusResult:
        """Version, uptime, models and queue totals."""
        running, waiting = self.scheduler.totals()
        return StatusResult(
            version=__version__,
            pid=self.pid,
            uptime_s=round(time.monotonic() - self.started_at, 3),
            state=self.state,
            models=list(self.backends),
            default_model=self.config.llm.default_model,
            running=running,
            waiting=waiting,
            connections=self.connections,
            caller_uid=caller.uid,
            caller_role=self.access.role(caller).value,
        )

    def system_queue(self) -> QueueResult:
        """Running and waiting requests per model."""
        return QueueResult(
            models=[QueueModel(model=name, **v) for name, v in self.scheduler.view().items()]  # type: ignore[arg-type]
        )

    def status_line(self) -> str:
        """One line for systemd's STATUS=."""
        running, waiting = self.scheduler.totals()
        return (
            f"{len(self.backends)} model(s), {running} running, {waiting} waiting, "
            f"{self.connections} connection(s)"
        )


async def _closing(
    step: Callable[[], Awaitable[Any]], timeout: float, failure: str, *args: object
) -> None:
    """Run one step of a stop for at most ``timeout``; log (never raise) if it fails."""
    try:
        await asyncio.wait_for(step(), timeout=timeout)
    except Exception:
        # stacklevel: the record names Kernel.stop, as when this was written out there.
        log.exception(failure, *args, stacklevel=2)


__all__ = ["Kernel", "AiosError"]

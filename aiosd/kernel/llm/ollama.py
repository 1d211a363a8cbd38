"""Server backend: a model served by an Ollama daemon over its HTTP API.

Ollama schedules generations itself, so ``slots`` only bounds how many requests aiosd sends
at once.  The daemon starts even when Ollama is down: ``start`` only logs a warning, and each
``chat`` reports an unreachable server as :class:`BackendUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import httpx
import ollama

from aiosd.config import OllamaModelConfig
from aiosd.errors import AiosError, BackendUnavailable, ModelNotFound, NotSupported
from aiosd.kernel.llm.base import Backend, ChatChunk, ChatRequest, ModelInfo

log = logging.getLogger(__name__)

START_CHECK_TIMEOUT = 5.0


def to_ollama_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """Turn an ``llm.chat`` message into the shape of Ollama's ``/api/chat``."""
    out: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = [
            {"function": {"name": call["name"], "arguments": dict(call.get("arguments") or {})}}
            for call in calls
        ]
    if message.get("tool_name"):
        out["tool_name"] = message["tool_name"]
    return out


def to_ollama_tool(spec: Mapping[str, Any]) -> ollama.Tool:
    """Wrap a tool spec so its JSON schema reaches the server unchanged.

    ``ollama.Tool`` validation keeps only a few keys of each parameter (nested ``properties``,
    ``minimum``, ``format`` ... are dropped), so the model is built without validation.
    """
    function = dict(spec.get("function") or {})
    return ollama.Tool.model_construct(
        type=spec.get("type", "function"),
        function=ollama.Tool.Function.model_construct(
            name=function.get("name"),
            description=function.get("description"),
            parameters=function.get("parameters"),
        ),
    )


def tool_calls_of(message: ollama.Message | None) -> list[dict[str, Any]]:
    """The tool calls of a response message as ``{"name", "arguments"}`` dicts."""
    if message is None or not message.tool_calls:
        return []
    return [
        {"name": call.function.name, "arguments": dict(call.function.arguments or {})}
        for call in message.tool_calls
    ]


class OllamaBackend(Backend):
    """A model on an Ollama server, reached with the official ``ollama`` client."""

    def __init__(self, name: str, cfg: OllamaModelConfig) -> None:
        super().__init__(name, cfg.slots)
        self.cfg = cfg
        self.model = cfg.model or name
        self._client = ollama.AsyncClient(host=cfg.host, timeout=cfg.timeout)

    async def start(self) -> None:
        """Check once that the server answers and lists the model; only warn if not."""
        try:
            listing = await asyncio.wait_for(
                self._client.list(), timeout=min(self.cfg.timeout, START_CHECK_TIMEOUT)
            )
        except Exception as exc:  # noqa: BLE001 - the daemon must start without Ollama
            log.warning(
                "model %r: Ollama at %s is not reachable (%s); requests will fail until it "
                "runs (check `systemctl status ollama`)",
                self.name,
                self.cfg.host,
                self._translate(exc).message,
            )
            return
        names = {entry.model for entry in listing.models if entry.model}
        if self.model not in names and f"{self.model}:latest" not in names:
            log.warning(
                "model %r: Ollama at %s does not list %r; run `ollama pull %s`",
                self.name,
                self.cfg.host,
                self.model,
                self.model,
            )

    async def close(self) -> None:
        """Close the HTTP client."""
        try:
            await self._client.close()  # type: ignore[no-untyped-call]  # unannotated upstream
        except Exception as exc:  # noqa: BLE001 - shutdown must go on
            log.debug("closing the Ollama client failed: %s", exc)

    def info(self) -> ModelInfo:
        """Describe the model for ``llm.models``."""
        return ModelInfo(
            name=self.name,
            backend="ollama",
            slots=self.cfg.slots,
            context_length=None,
            detail={"host": self.cfg.host, "model": self.model},
        )

    async def chat(self, request: ChatRequest, slot: int) -> AsyncGenerator[ChatChunk, None]:
        """Stream one answer from ``/api/chat``; the HTTP stream is closed on cancellation."""
        stream = await self._open(request)
        saw_tool_calls = False
        try:
            while True:
                try:
                    part = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    raise self._translate(exc) from exc
                content = (part.message.content or "") if part.message else ""
                calls = tool_calls_of(part.message)
                saw_tool_calls = saw_tool_calls or bool(calls)
                if not part.done:
                    if content or calls:
                        yield ChatChunk(content=content, tool_calls=calls)
                    continue
                yield ChatChunk(
                    content=content,
                    tool_calls=calls,
                    done=True,
                    finish_reason="tool_calls" if saw_tool_calls else part.done_reason or "stop",
                    prompt_tokens=part.prompt_eval_count or 0,
                    completion_tokens=part.eval_count or 0,
                )
                return
            raise BackendUnavailable(
                f"Ollama at {self.cfg.host} ended the answer of {self.model!r} without a "
                "final message",
                data=self._data(),
            )
        finally:
            await self._close_stream(stream)

    async def _open(self, request: ChatRequest) -> AsyncIterator[ollama.ChatResponse]:
        """Build the request and get the (not yet started) response stream."""
        options: dict[str, Any] = {
            "temperature": request.temperature,
            "num_predict": request.max_tokens or self.cfg.max_tokens,
        }
        if request.seed is not None:
            options["seed"] = request.seed
        try:
            messages = [to_ollama_message(m) for m in request.messages]
            tools = [to_ollama_tool(t) for t in request.tools] if request.tools else None
            with warnings.catch_warnings():
                # The unvalidated tool schemas make pydantic warn while serializing them.
                warnings.filterwarnings(
                    "ignore", message="Pydantic serializer warnings", category=UserWarning
                )
                return await self._client.chat(
                    model=self.model,
                    messages=messages,
                    tools=tools,
                    stream=True,
                    format=request.response_schema or None,
                    options=options,
                )
        except Exception as exc:
            raise self._translate(exc) from exc

    @staticmethod
    async def _close_stream(stream: AsyncIterator[ollama.ChatResponse]) -> None:
        """Close the response stream (and so the HTTP response) if it is still open."""
        aclose = getattr(stream, "aclose", None)
        if aclose is None:
            return
        try:
            await aclose()
        except Exception as exc:  # noqa: BLE001 - closing is best effort
            log.debug("closing an Ollama stream failed: %s", exc)

    def _data(self) -> dict[str, Any]:
        return {"host": self.cfg.host, "model": self.model}

    def _translate(self, exc: BaseException) -> AiosError:
        """Map an exception of the client (or of httpx beneath it) to the error tree."""
        host, model = self.cfg.host, self.model
        if isinstance(exc, AiosError):
            return exc
        if isinstance(exc, ollama.ResponseError):
            text = str(exc.error)
            lowered = text.lower()
            if exc.status_code == 404 or "not found" in lowered:
                return ModelNotFound(
                    f"Ollama at {host} has no model {model!r} ({text}); "
                    f"pull it with `ollama pull {model}`",
                    data=self._data(),
                )
            if "does not support" in lowered:
                return NotSupported(f"Ollama model {model!r}: {text}", data=self._data())
            return BackendUnavailable(f"Ollama at {host} failed: {text}", data=self._data())
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, ConnectionError)):
            return BackendUnavailable(
                f"cannot connect to Ollama at {host}; check that Ollama runs "
                "(`systemctl status ollama`) and that the host is right",
                data=self._data(),
            )
        if isinstance(exc, (httpx.TimeoutException, TimeoutError)):
            return BackendUnavailable(
                f"Ollama at {host} did not answer within {self.cfg.timeout:g}s",
                data=self._data(),
            )
        if isinstance(exc, httpx.HTTPError):
            return BackendUnavailable(
                f"the connection to Ollama at {host} failed: {exc}", data=self._data()
            )
        return BackendUnavailable(
            f"unexpected answer from Ollama at {host}: {type(exc).__name__}: {exc}",
            data=self._data(),
        )

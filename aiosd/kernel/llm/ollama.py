"""Server backend: a model served by an Ollama daemon over its HTTP API.

Ollama schedules generations itself, so ``slots`` only bounds how many requests aiosd sends
at once.  The daemon starts even when Ollama is down: ``start`` only logs a warning, and each
``chat`` reports an unreachable server as :class:`BackendUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
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


def to_ollama_tool(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A tool spec in the shape of Ollama's ``tools`` field, its JSON schema unchanged."""
    function = dict(spec.get("function") or {})
    out: dict[str, Any] = {"name": function.get("name")}
    if function.get("description"):
        out["description"] = function["description"]
    if function.get("parameters") is not None:
        out["parameters"] = function["parameters"]
    return {"type": spec.get("type", "function"), "function": out}


def tool_calls_of(message: ollama.Message | None) -> list[dict[str, Any]]:
    """The tool calls of a response message as ``{"name", "arguments"}`` dicts."""
    if message is None or not message.tool_calls:
        return []
    return [
        {"name": call.function.name, "arguments": dict(call.function.arguments or {})}
        for call in message.tool_calls
    ]


class OllamaBackend(Backend):
    """A model on an Ollama server: the official ``ollama`` client, chats streamed over httpx."""

    def __init__(self, name: str, cfg: OllamaModelConfig) -> None:
        super().__init__(name, cfg.slots)
        self.cfg = cfg
        self.model = cfg.model or name
        self._client = ollama.AsyncClient(host=cfg.host, timeout=cfg.timeout)
        #: Streamed chats go over httpx directly (see :meth:`chat`).
        self._http = httpx.AsyncClient(
            base_url=cfg.host,
            timeout=cfg.timeout,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )

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
        for close in (self._client.close, self._http.aclose):
            try:
                await close()
            except Exception as exc:  # noqa: BLE001 - shutdown must go on
                log.debug("closing an Ollama client failed: %s", exc)

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
        """Stream one answer from ``/api/chat``; the HTTP stream is closed on cancellation.

        The stream is read here rather than through the client library's iterator: closed
        early, that iterator leaves httpx's line iterators suspended for the garbage
        collector.  Here an early end closes the response, then reads the line iterator
        once more, so that every iterator beneath it ends on the closed stream.
        """
        saw_tool_calls = False
        async with contextlib.AsyncExitStack() as stack:
            try:
                response = await stack.enter_async_context(
                    self._http.stream("POST", "/api/chat", json=self._body(request))
                )
                if response.is_error:
                    await response.aread()
                    raise ollama.ResponseError(response.text, response.status_code)
            except Exception as exc:
                raise self._translate(exc) from exc
            lines = response.aiter_lines()
            stack.push_async_callback(_end_lines, response, lines)
            while True:
                try:
                    line = await lines.__anext__()
                    if not line:
                        continue
                    part = _part(line)
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

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body of a streamed ``/api/chat`` request (Ollama's documented fields)."""
        options: dict[str, Any] = {
            "temperature": request.temperature,
            "num_predict": request.max_tokens or self.cfg.max_tokens,
        }
        if request.seed is not None:
            options["seed"] = request.seed
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [to_ollama_message(m) for m in request.messages],
            "stream": True,
            "options": options,
        }
        if request.tools and request.tool_choice != "none":
            # Sent as given: the JSON schema of each tool reaches the server unchanged.
            body["tools"] = [to_ollama_tool(t) for t in request.tools]
        if request.response_schema:
            body["format"] = request.response_schema
        return body

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


def _part(line: str) -> ollama.ChatResponse:
    """One line of the stream as a response part; an ``error`` line raises ResponseError."""
    raw = json.loads(line)
    if isinstance(raw, dict) and (err := raw.get("error")):
        raise ollama.ResponseError(str(err))
    return ollama.ChatResponse.model_validate(raw)


async def _end_lines(response: httpx.Response, lines: AsyncIterator[str]) -> None:
    """Close the response, then let the line iterator (and those beneath it) end on it."""
    await response.aclose()
    with contextlib.suppress(Exception, StopAsyncIteration):
        await lines.__anext__()

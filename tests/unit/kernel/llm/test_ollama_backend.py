"""OllamaBackend against a local stub that speaks Ollama's HTTP API."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import ollama
import pytest

from aiosd.config import OllamaModelConfig
from aiosd.errors import BackendUnavailable, ModelNotFound
from aiosd.kernel.llm.base import ChatChunk, ChatRequest
from aiosd.kernel.llm.ollama import OllamaBackend
from tests.ollama_stub import OllamaStub

T = TypeVar("T")

HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def stub() -> Iterator[OllamaStub]:
    with OllamaStub(reply="Hello there from the stub") as server:
        yield server


def make_backend(host: str, model: str = "stub", **kw: Any) -> OllamaBackend:
    cfg = OllamaModelConfig(backend="ollama", host=host, model=model, **kw)
    return OllamaBackend("local", cfg)


def run(backend: OllamaBackend, body: Callable[[OllamaBackend], Awaitable[T]]) -> T:
    """Run ``body(backend)`` in a fresh event loop and close the backend afterwards."""

    async def main() -> T:
        try:
            return await body(backend)
        finally:
            await backend.close()

    return asyncio.run(main())


async def collect(backend: OllamaBackend, request: ChatRequest) -> list[ChatChunk]:
    return [chunk async for chunk in backend.chat(request, 0)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_info_names_host_and_model() -> None:
    backend = make_backend("http://127.0.0.1:11434", model="")
    info = backend.info()
    assert (info.name, info.backend, info.slots, info.context_length) == (
        "local",
        "ollama",
        1,
        None,
    )
    assert info.detail == {"host": "http://127.0.0.1:11434", "model": "local"}
    asyncio.run(backend.close())


def test_streams_content_then_done_chunk_with_counts(stub: OllamaStub) -> None:
    chunks = run(make_backend(stub.url), lambda b: collect(b, ChatRequest(messages=HELLO)))
    content = [c for c in chunks if not c.done]
    assert len(content) == 5
    assert "".join(c.content for c in chunks) == "Hello there from the stub"
    final = chunks[-1]
    assert final.done and sum(c.done for c in chunks) == 1
    assert final.finish_reason == "stop"
    assert final.prompt_tokens == 6  # 2 words + 4 per message, as the stub counts
    assert final.completion_tokens == 5
    sent = stub.chat_requests()[-1].body
    assert sent["model"] == "stub"
    assert sent["stream"] is True
    assert sent["messages"] == HELLO


def test_options_and_format_reach_the_server(stub: OllamaStub) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    request = ChatRequest(messages=HELLO, temperature=0.5, seed=42, response_schema=schema)
    run(make_backend(stub.url, max_tokens=77), lambda b: collect(b, request))
    sent = stub.chat_requests()[-1].body
    assert sent["options"] == {"temperature": 0.5, "seed": 42, "num_predict": 77}
    assert sent["format"] == schema
    assert not sent.get("tools")  # the client always sends a list, empty here


def test_request_max_tokens_wins_and_length_is_reported(stub: OllamaStub) -> None:
    request = ChatRequest(messages=HELLO, max_tokens=2)
    chunks = run(make_backend(stub.url), lambda b: collect(b, request))
    sent = stub.chat_requests()[-1].body
    assert sent["options"] == {"temperature": 0.0, "num_predict": 2}
    assert "format" not in sent
    assert "".join(c.content for c in chunks) == "Hello there"
    assert chunks[-1].finish_reason == "length"


def test_tool_calls_come_back_as_name_and_arguments(stub: OllamaStub) -> None:
    stub.tool_arguments = {"city": "Paris", "days": 3}
    nested = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 1},
            "when": {"type": "object", "properties": {"days": {"type": "integer", "minimum": 1}}},
        },
        "required": ["city"],
    }
    tools = [{"type": "function", "function": {"name": "weather", "parameters": nested}}]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "clock", "arguments": {}}]},
        {"role": "tool", "content": "12:00", "tool_name": "clock"},
        {"role": "user", "content": "And in Paris?"},  # (the stub calls a tool for this turn)
    ]
    request = ChatRequest(messages=messages, tools=tools)
    chunks = run(make_backend(stub.url), lambda b: collect(b, request))
    calls = [call for c in chunks for call in c.tool_calls]
    assert calls == [{"name": "weather", "arguments": {"city": "Paris", "days": 3}}]
    assert chunks[-1].done and chunks[-1].finish_reason == "tool_calls"
    sent = stub.chat_requests()[-1].body
    # The schema reaches the server unchanged (ollama.Tool validation would drop parts).
    assert sent["tools"] == tools
    assert sent["messages"][1]["tool_calls"] == [{"function": {"name": "clock", "arguments": {}}}]
    assert sent["messages"][2] == {"role": "tool", "content": "12:00", "tool_name": "clock"}


def test_unreachable_server_is_backend_unavailable() -> None:
    host = f"http://127.0.0.1:{free_port()}"
    backend = make_backend(host)
    with pytest.raises(BackendUnavailable) as info:
        run(backend, lambda b: collect(b, ChatRequest(messages=HELLO)))
    assert host in info.value.message
    assert "systemctl status ollama" in info.value.message


def test_missing_model_is_model_not_found(stub: OllamaStub) -> None:
    backend = make_backend(stub.url, model="nosuch:7b")
    with pytest.raises(ModelNotFound) as info:
        run(backend, lambda b: collect(b, ChatRequest(messages=HELLO)))
    assert "nosuch:7b" in info.value.message
    assert "ollama pull nosuch:7b" in info.value.message


def test_error_in_the_middle_of_a_stream_is_backend_unavailable(stub: OllamaStub) -> None:
    stub.error_after = 2
    seen: list[ChatChunk] = []

    async def body(backend: OllamaBackend) -> None:
        async for chunk in backend.chat(ChatRequest(messages=HELLO), 0):
            seen.append(chunk)

    with pytest.raises(BackendUnavailable) as info:
        run(make_backend(stub.url), body)
    assert [c.content for c in seen] == ["Hello", " there"]
    assert "an error was encountered" in info.value.message


def test_cancelling_the_task_closes_the_stream() -> None:
    with OllamaStub(reply=" ".join(["word"] * 200), delay=0.05) as slow:

        async def body(backend: OllamaBackend) -> float:
            first = asyncio.Event()

            async def consume() -> None:
                async for _ in backend.chat(ChatRequest(messages=HELLO), 0):
                    first.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(first.wait(), 5)
            started = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - started

        elapsed = run(make_backend(slow.url), body)
        assert elapsed < 1.0
        assert slow.disconnected.wait(5), "the stub never saw the connection close"
        assert not slow.finished.is_set()


def test_closing_the_generator_closes_the_stream() -> None:
    with OllamaStub(reply=" ".join(["word"] * 200), delay=0.05) as slow:

        async def body(backend: OllamaBackend) -> str:
            stream = backend.chat(ChatRequest(messages=HELLO), 0)
            first = await stream.__anext__()
            await stream.aclose()  # type: ignore[attr-defined]
            return first.content

        assert run(make_backend(slow.url), body) == "word"
        assert slow.disconnected.wait(5), "the stub never saw the connection close"
        assert not slow.finished.is_set()


def test_start_warns_but_does_not_fail_when_server_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="aiosd.kernel.llm.ollama"):
        run(make_backend(host), lambda b: b.start())
    assert any(host in r.getMessage() for r in caplog.records)


def test_start_warns_about_a_model_the_server_lacks(
    stub: OllamaStub, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="aiosd.kernel.llm.ollama"):
        run(make_backend(stub.url, model="stub"), lambda b: b.start())
        assert caplog.records == []
        run(make_backend(stub.url, model="other"), lambda b: b.start())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "ollama pull other" in messages[0]
    assert [r.path for r in stub.requests] == ["/api/tags", "/api/tags"]


def test_stub_answers_non_streaming_requests_like_ollama(stub: OllamaStub) -> None:
    # Made before the loop runs, as the daemon makes its clients: building one loads TLS
    # certificates, tens of milliseconds of CPU that would hold the loop.
    client = ollama.AsyncClient(host=stub.url)

    async def body() -> ollama.ChatResponse:
        try:
            tools = [{"type": "function", "function": {"name": "weather"}}]
            return await client.chat(model="stub", messages=HELLO, tools=tools, stream=False)
        finally:
            await client.close()  # type: ignore[no-untyped-call]

    answer = asyncio.run(body())
    assert answer.done and answer.done_reason == "stop"
    assert answer.message.tool_calls is not None
    assert answer.message.tool_calls[0].function.name == "weather"
    assert answer.message.tool_calls[0].function.arguments == {"city": "Paris"}
    assert stub.chat_requests()[-1].body["stream"] is False

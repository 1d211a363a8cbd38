"""A local stand-in for an Ollama server, following its documented HTTP API.

It answers ``GET /api/tags`` and ``POST /api/chat`` (streamed as chunked
``application/x-ndjson``, or one JSON object with ``"stream": false``), returns a tool call
when the request offers tools (and its last message is not a tool's result), and a 404
``{"error": ...}`` body for unknown models.  Every request is recorded, and a streamed answer
notices when the client drops the connection.

Usage::

    with OllamaStub(reply="Hello there", delay=0.0) as stub:
        client = ollama.AsyncClient(host=stub.url)
        ...
        assert stub.requests[-1].body["options"]["temperature"] == 0.5
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

STUB_MODEL = "stub:latest"


@dataclass
class RecordedRequest:
    """One request the stub received."""

    method: str
    path: str
    body: Any = None


@dataclass
class OllamaStub:
    """A threaded HTTP server that speaks a small part of Ollama's API."""

    reply: str = "Hello from the stub model."
    delay: float = 0.0
    models: tuple[str, ...] = (STUB_MODEL,)
    tool_arguments: dict[str, Any] = field(default_factory=lambda: {"city": "Paris"})
    error_after: int | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """Base URL of the running server, e.g. ``http://127.0.0.1:40123``."""
        if self._server is None:
            raise RuntimeError("the stub is not running")
        return f"http://127.0.0.1:{self._server.server_port}"

    def start(self) -> Self:
        """Bind 127.0.0.1 on a free port and serve in a daemon thread."""
        stub: OllamaStub = self

        class Handler(_Handler):
            owner = stub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="ollama-stub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, request: RecordedRequest) -> None:
        """Keep a received request (called from handler threads)."""
        with self._lock:
            self.requests.append(request)

    def chat_requests(self) -> list[RecordedRequest]:
        """The ``/api/chat`` requests received so far."""
        with self._lock:
            return [r for r in self.requests if r.path == "/api/chat"]

    def knows(self, model: str) -> bool:
        """Whether ``model`` (with or without the ``:latest`` tag) is "pulled"."""
        name = model if ":" in model else f"{model}:latest"
        return name in self.models


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _pieces(text: str) -> list[str]:
    """Split a reply into word-sized stream pieces that join back to ``text``."""
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words) if w or i == 0]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: OllamaStub

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet."""

    # -- plumbing -------------------------------------------------------------------------

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _read_body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    # -- endpoints ------------------------------------------------------------------------

    def do_GET(self) -> None:
        self.owner.record(RecordedRequest("GET", self.path))
        if self.path == "/api/tags":
            self._send_json(200, {"models": [_tag(name) for name in self.owner.models]})
        elif self.path == "/":
            self._send_json(200, "Ollama is running")
        else:
            self._send_json(404, {"error": "404 page not found"})

    def do_POST(self) -> None:
        body = self._read_body()
        self.owner.record(RecordedRequest("POST", self.path, body))
        if self.path != "/api/chat":
            self._send_json(404, {"error": "404 page not found"})
            return
        if not isinstance(body, dict) or not body.get("model"):
            self._send_json(400, {"error": "model is required"})
            return
        model = body["model"]
        if not self.owner.knows(model):
            self._send_json(404, {"error": f'model "{model}" not found, try pulling it first'})
            return
        self._chat(body)

    def _chat(self, body: dict[str, Any]) -> None:
        stub = self.owner
        model = body["model"]
        options = body.get("options") or {}
        messages = body.get("messages") or []
        prompt_tokens = sum(len(str(m.get("content", "")).split()) + 4 for m in messages)
        tools = body.get("tools") or []
        tool_calls: list[dict[str, Any]] = []
        # Like a model that answers once it has a tool's result: a call while none is in.
        if tools and (messages[-1].get("role") if messages else None) != "tool":
            name = tools[0].get("function", {}).get("name", "")
            tool_calls = [{"function": {"name": name, "arguments": stub.tool_arguments}}]
            pieces: list[str] = []
        else:
            pieces = _pieces(stub.reply)
        done_reason = "stop"
        limit = options.get("num_predict")
        if isinstance(limit, int) and 0 <= limit < len(pieces):
            pieces, done_reason = pieces[:limit], "length"
        eval_count = max(len(pieces), 1)
        final = {
            "done": True,
            "done_reason": done_reason,
            "total_duration": 4883583458,
            "load_duration": 1334875,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 342546000,
            "eval_count": eval_count,
            "eval_duration": 4535599000,
        }

        if body.get("stream") is False:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
            if tool_calls:
                message["tool_calls"] = tool_calls
            self._send_json(
                200, {"model": model, "created_at": _now(), "message": message, **final}
            )
            stub.finished.set()
            return

        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        lines: list[dict[str, Any]] = [
            {
                "model": model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": piece},
                "done": False,
            }
            for piece in pieces
        ]
        if tool_calls:
            lines.append(
                {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": "", "tool_calls": tool_calls},
                    "done": False,
                }
            )
        lines.append(
            {
                "model": model,
                "created_at": _now(),
                "message": {"role": "assistant", "content": ""},
                **final,
            }
        )
        try:
            for index, line in enumerate(lines):
                if stub.error_after is not None and index == stub.error_after:
                    self._send_chunk(
                        json.dumps({"error": "an error was encountered"}).encode() + b"\n"
                    )
                    break
                if index and stub.delay:
                    time.sleep(stub.delay)
                self._send_chunk(json.dumps(line).encode() + b"\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            stub.disconnected.set()
            self.close_connection = True
            return
        stub.finished.set()


def _tag(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": "2024-11-04T14:56:49.277302595-07:00",
        "size": 270898672,
        "digest": "9f438cb9cd581fc025612d27f7c1a6669ff83a8bb0ed86c94fcf4c5440555697",
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "135M",
            "quantization_level": "Q8_0",
        },
    }

"""Client library for agents and apps: JSON-RPC 2.0 over aiosd's Unix socket.

``AsyncClient`` for asyncio programs, ``Client`` for everything else.  Errors come back as
the daemon's own :class:`~aiosd.errors.AiosError` subclasses; a daemon that cannot be reached
raises :class:`DaemonUnreachable` naming the socket path tried.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from aiosd.api.socket import STREAM_METHOD
from aiosd.errors import AiosError, InternalError, error_for_code
from aiosd.paths import DEFAULT_SOCKET

READ_LIMIT = 64 * 1024 * 1024


def default_socket() -> Path:
    """$AIOSD_SOCKET, else the default socket (/run/aiosd/aiosd.sock)."""
    return Path(os.environ.get("AIOSD_SOCKET") or DEFAULT_SOCKET)


class DaemonUnreachable(ConnectionError):
    """The daemon cannot be reached (its socket, or its name on the bus)."""

    def __init__(self, path: Path | str, reason: str, hint: str = "pass --socket PATH") -> None:
        self.path = path
        super().__init__(
            f"cannot reach aiosd at {path}: {reason}. Is the daemon running? Start it with "
            f"'systemctl start aiosd' (or run 'aiosd' in a terminal), or {hint}."
        )


def _raise_error(err: Any) -> None:
    if not isinstance(err, dict):
        raise InternalError(f"malformed error from the daemon: {err!r}")
    raise error_for_code(int(err.get("code", -32000)), str(err.get("message", "")), err.get("data"))


def _outcome(msg: dict[str, Any]) -> tuple[bool, Any]:
    """A message for a request: ``(True, params)`` for a stream notification, ``(False,
    result)`` for the final reply; an error reply raises its AiosError."""
    if msg.get("method") == STREAM_METHOD:
        return True, msg["params"]
    if "error" in msg:
        _raise_error(msg["error"])
    return False, msg.get("result")


def _chat_params(prompt: str, params: dict[str, Any]) -> dict[str, Any]:
    """``llm.chat`` params with one user message."""
    return {"messages": [{"role": "user", "content": prompt}], **params}


def _frame(req_id: int, method: str, params: dict[str, Any] | None) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
    if params is not None:
        msg["params"] = params
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class SyscallClient(Protocol):
    """What aiosctl needs of a client: the socket's Client and the D-Bus BusClient both fit."""

    last_result: Any

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Make one syscall and return its result."""

    def stream(self, method: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Yield a streaming syscall's notifications; leave the result in last_result."""


class AsyncClient:
    """An asyncio connection to aiosd; several calls may run at once on it."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path else default_socket()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._pump: asyncio.Task[None] | None = None

    async def connect(self) -> AsyncClient:
        """Open the connection."""
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(
                str(self.path), limit=READ_LIMIT
            )
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            raise DaemonUnreachable(self.path, exc.strerror or str(exc)) from None
        self._pump = asyncio.create_task(self._read_loop())
        return self

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; calls still waiting fail."""
        if self._pump is not None:
            self._pump.cancel()
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (ConnectionError, BrokenPipeError):
                pass

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                if msg.get("method") == STREAM_METHOD:
                    key = msg.get("params", {}).get("id")
                else:
                    key = msg.get("id")
                queue = self._pending.get(key)
                if queue is not None:
                    queue.put_nowait(msg)
                elif "error" in msg and msg.get("id") is None:
                    for q in self._pending.values():
                        q.put_nowait(msg)
        finally:
            for q in self._pending.values():
                q.put_nowait({"closed": True})

    async def _start(
        self, method: str, params: dict[str, Any] | None
    ) -> tuple[int, asyncio.Queue[dict[str, Any]]]:
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        req_id = next(self._ids)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pending[req_id] = queue
        self._writer.write(_frame(req_id, method, params))
        await self._writer.drain()
        return req_id, queue

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Make one syscall and return its result."""
        box: list[Any] = []
        async for _ in self.stream(method, params, on_result=box.append):
            pass
        return box[0]

    async def stream(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        on_result: Callable[[Any], None] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Make a streaming syscall: yield each notification's params, then end.

        The final result is passed to ``on_result``; an error is raised as AiosError.
        """
        req_id, queue = await self._start(method, params)
        try:
            while True:
                msg = await queue.get()
                if msg.get("closed"):
                    raise DaemonUnreachable(self.path, "the daemon closed the connection")
                is_note, value = _outcome(msg)
                if is_note:
                    yield value
                    continue
                if on_result is not None:
                    on_result(value)
                return
        finally:
            self._pending.pop(req_id, None)

    async def chat(self, prompt: str, **params: Any) -> dict[str, Any]:
        """``llm.chat`` with one user message; returns the ChatResult dict."""
        result: dict[str, Any] = await self.call("llm.chat", _chat_params(prompt, params))
        return result


class Client:
    """A blocking connection to aiosd, one call at a time."""

    def __init__(self, path: Path | str | None = None, timeout: float | None = None) -> None:
        self.path = Path(path) if path else default_socket()
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._file: Any = None
        self._ids = itertools.count(1)

    def connect(self) -> Client:
        """Open the connection."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError, PermissionError) as exc:
            sock.close()
            raise DaemonUnreachable(self.path, exc.strerror or str(exc)) from None
        self._sock = sock
        self._file = sock.makefile("rb")
        return self

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        if self._file is not None:
            self._file.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._file = None

    def stream(self, method: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Yield each stream notification's params; the result is left in ``last_result``."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        req_id = next(self._ids)
        try:
            self._sock.sendall(_frame(req_id, method, params))
        except OSError as exc:
            raise DaemonUnreachable(self.path, f"sending failed: {exc.strerror or exc}") from None
        while True:
            try:
                line = self._file.readline()
            except OSError as exc:
                raise DaemonUnreachable(
                    self.path, f"reading failed: {exc.strerror or exc}"
                ) from None
            if not line:
                raise DaemonUnreachable(self.path, "the daemon closed the connection")
            is_note, value = _outcome(json.loads(line))
            if is_note:
                yield value
                continue
            self.last_result = value
            return

    last_result: Any = None

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Make one syscall and return its result."""
        for _ in self.stream(method, params):
            pass
        return self.last_result

    def chat(self, prompt: str, **params: Any) -> dict[str, Any]:
        """``llm.chat`` with one user message; returns the ChatResult dict."""
        result: dict[str, Any] = self.call("llm.chat", _chat_params(prompt, params))
        return result


__all__ = ["AsyncClient", "Client", "DaemonUnreachable", "AiosError", "default_socket"]

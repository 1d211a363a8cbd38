"""JSON-RPC 2.0 over a Unix stream socket: one JSON object per line.

Thin by design: read a frame, build the :class:`Caller` from SO_PEERCRED (never from the
payload), ``await kernel.dispatch``, encode the result or error.  Streaming syscalls send
``stream`` notifications carrying the request id before the final response.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import os
import pwd
import select
import socket
import stat
import struct
import time
from pathlib import Path
from typing import Any

from aiosd.config import SocketConfig
from aiosd.errors import (
    AiosError,
    FrameTooLarge,
    InternalError,
    InvalidRequest,
    ParseError,
    ShuttingDown,
    TooManyConnections,
    TooManyRequests,
)
from aiosd.kernel.kernel import Kernel
from aiosd.managers.access import Caller

log = logging.getLogger(__name__)

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
STREAM_METHOD = "stream"


def peer_caller(sock: socket.socket) -> Caller:
    """The connecting process's identity, from the kernel (SO_PEERCRED, SO_PEERGROUPS)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    groups: set[int] = set()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
        groups = set(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:
        # Older kernels: fall back to the group database for the peer's user.
        with contextlib.suppress(KeyError):
            groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    return Caller(uid=uid, gid=gid, pid=pid, groups=frozenset(groups))


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _error(req_id: Any, err: AiosError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": req_id, "error": err.to_rpc()}


class SocketServer:
    """The listening socket and its connections."""

    def __init__(self, kernel: Kernel, cfg: SocketConfig, path: Path) -> None:
        self.kernel = kernel
        self.cfg = cfg
        self.path = path
        self.activated = False
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._serial = 0
        self._boot = f"{int(time.time()):x}"

    async def start(self, sock: socket.socket | None = None) -> None:
        """Serve on ``sock`` (from socket activation) or bind ``self.path``."""
        if sock is None:
            sock = self._bind()
        else:
            self.activated = True
            name = sock.getsockname()
            if isinstance(name, str) and name:
                self.path = Path(name)
        self._server = await asyncio.start_unix_server(
            # readline() refuses a line whose newline lies beyond index ``limit``: with
            # max_frame_bytes - 1 the longest frame accepted is max_frame_bytes, newline included.
            self._accept,
            sock=sock,
            limit=self.cfg.max_frame_bytes - 1,
        )
        log.info("listening on %s%s", self.path, " (socket activation)" if self.activated else "")

    def _bind(self) -> socket.socket:
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(self.path))
                except OSError:
                    self.path.unlink()  # stale socket of a previous run
                else:
                    probe.close()
                    raise OSError(errno.EADDRINUSE, f"another daemon already serves {self.path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, self.cfg.mode)
        sock.listen(128)
        return sock

    async def self_check(self) -> None:
        """Connect to our own socket and make one call: READY=1 only after this answers."""
        reader, writer = await asyncio.open_unix_connection(str(self.path))
        try:
            writer.write(_encode({"jsonrpc": "2.0", "id": 0, "method": "system.status"}))
            await writer.drain()
            reply = json.loads(await reader.readline())
            if "result" not in reply:
                raise RuntimeError(f"self-check got {reply.get('error')}")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def stop_accepting(self, timeout: float) -> None:
        """Close the listening socket; established connections keep being served."""
        if self._server is not None:
            self._server.close()
            try:
                # Python 3.12+ also waits here for connections to end: bounded by the stage.
                await asyncio.wait_for(self._server.wait_closed(), timeout)
            except TimeoutError:
                pass
        if not self.activated:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def close(self) -> None:
        """Drop every connection."""
        conns = list(self._connections)
        for conn in conns:
            conn.close()
        await asyncio.gather(*(c.finished.wait() for c in conns), return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.cfg.max_connections:
            err = TooManyConnections(
                f"the daemon already serves {self.cfg.max_connections} connections "
                "(socket.max_connections)",
                data={"limit": self.cfg.max_connections},
            )
            writer.write(_encode(_error(None, err)))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        self._serial += 1
        # Unique across restarts too: a session's pinned memory outlives the daemon.
        session = f"socket-{self._boot}-{self._serial}"
        caller = dataclasses.replace(peer_caller(sock), session=session)
        conn = _Connection(self, reader, writer, caller)
        self._connections.add(conn)
        self.kernel.connections = len(self._connections)
        try:
            await conn.serve()
        finally:
            self._connections.discard(conn)
            self.kernel.connections = len(self._connections)
            await self.kernel.session_closed(caller)


class _Connection:
    """One client connection: a reader loop and one task per request in flight."""

    def __init__(
        self,
        server: SocketServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        caller: Caller,
    ) -> None:
        self.server = server
        self.kernel = server.kernel
        self.reader = reader
        self.writer = writer
        self.caller = caller
        self.tasks: set[asyncio.Task[None]] = set()
        self.replies: set[asyncio.Task[None]] = set()
        self.finished = asyncio.Event()
        self._reader_task: asyncio.Task[Any] | None = None

    def close(self) -> None:
        """Stop reading and cancel every request of this connection."""
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def serve(self) -> None:
        """Read frames until EOF; then cancel whatever is still running for this client."""
        self._reader_task = asyncio.current_task()
        try:
            if await self._read_loop() and self.tasks:
                # The client only shut down its writing side: answer what it asked.
                await asyncio.gather(*self.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            pass
        finally:
            # A client that went away cancels its generations, which frees their slots.
            # Shielded: a second cancel (daemon stopping) must not skip the cleanup.
            cleanup = asyncio.ensure_future(self._cleanup())
            try:
                await asyncio.shield(cleanup)
            except asyncio.CancelledError:
                await cleanup

    async def _cleanup(self) -> None:
        try:
            for task in list(self.tasks):
                task.cancel()
            pending = self.tasks | self.replies
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        finally:
            self.finished.set()

    async def _read_loop(self) -> bool:
        """Serve frames; return True at a half-close (peer still reading), False otherwise."""
        limit = self.server.cfg.max_frame_bytes
        while True:
            try:
                line = await self.reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                err = FrameTooLarge(
                    f"frame larger than {limit} bytes (socket.max_frame_bytes); closing",
                    data={"limit": limit},
                )
                await self._send(_error(None, err))
                return False
            except ConnectionError:
                return False
            if not line:
                return self._half_closed()
            if not line.strip():
                continue
            self._handle_frame(line)

    def _half_closed(self) -> bool:
        """At EOF: did the peer shut down only its writing side (it still reads)?

        A peer that closed or died leaves our socket fully shut down (POLLHUP); one that
        called shutdown(SHUT_WR) does not, and still expects its answers.
        """
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return not any(ev & select.POLLHUP for _, ev in poller.poll(0))

    def _handle_frame(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            self._reply_soon(None, ParseError(f"parse error: {exc}"))
            return
        req_id = msg.get("id") if isinstance(msg, dict) else None
        if not isinstance(req_id, (str, int, type(None))) or isinstance(req_id, bool):
            req_id = None
        if (
            not isinstance(msg, dict)
            or msg.get("jsonrpc") != "2.0"
            or not isinstance(msg.get("method"), str)
            or ("id" in msg and req_id is None and msg.get("id") is not None)
        ):
            self._reply_soon(
                req_id,
                InvalidRequest(
                    "invalid request: expected one JSON-RPC 2.0 object with 'jsonrpc': '2.0', "
                    "a string 'method' and an integer or string 'id'"
                ),
            )
            return
        limit = self.server.cfg.max_inflight_per_connection
        if len(self.tasks) >= limit:
            self._reply_soon(
                req_id,
                TooManyRequests(
                    f"this connection already has {limit} requests in flight "
                    "(socket.max_inflight_per_connection); wait for one to finish",
                    data={"limit": limit},
                ),
            )
            return
        notify_only = "id" not in msg
        task = asyncio.create_task(self._run(req_id, msg["method"], msg.get("params"), notify_only))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _reply_soon(self, req_id: Any, err: AiosError) -> None:
        # Error replies are not requests in flight: they do not count against the limit.
        task = asyncio.create_task(self._send(_error(req_id, err)))
        self.replies.add(task)
        task.add_done_callback(self.replies.discard)

    async def _run(self, req_id: Any, method: str, params: Any, notify_only: bool) -> None:
        async def emit(note: dict[str, Any]) -> None:
            if not notify_only:
                await self._send(
                    {"jsonrpc": "2.0", "method": STREAM_METHOD, "params": {"id": req_id, **note}}
                )

        try:
            result = await self.kernel.dispatch(method, params, self.caller, emit)
            reply: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "result": result}
        except AiosError as exc:
            reply = _error(req_id, exc)
        except ConnectionError:
            return
        except asyncio.CancelledError:
            if self.kernel.state == "stopping" and not notify_only:
                # Cut off by the stop's drain timeout: tell the client rather than go silent.
                with contextlib.suppress(Exception):
                    await self._send(
                        _error(
                            req_id, ShuttingDown("the daemon stopped before this request finished")
                        )
                    )
            raise
        except Exception:
            log.exception("request %r (%s) failed", req_id, method)
            reply = _error(req_id, InternalError("internal error; the daemon log has details"))
        if not notify_only:
            await self._send(reply)

    async def _send(self, obj: dict[str, Any]) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(_encode(obj))
        try:
            await self.writer.drain()
        except ConnectionError:
            # The peer is gone: stop reading so its remaining requests get cancelled.
            self.close()

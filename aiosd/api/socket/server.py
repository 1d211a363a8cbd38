"""JSON-RPC 2.0 over a Unix stream socket: one JSON object per line.

Thin by design: read a frame, build the :class:`Caller` from SO_PEERCRED (never from the
payload), hand the call to the kernel, encode the result or error.  Streaming syscalls send
``stream`` notifications carrying the request id before the final response.

Each connection is an :class:`asyncio.Protocol`, not a stream reader with a task per request:
a syscall that answers at once (``system.status``) is parsed, dispatched, audited and answered
inside one ``data_received`` call, with no task and no extra turn of the event loop.  Only a
syscall that waits (``llm.chat``, storage) gets a task, whose completion writes the reply.
Backpressure: while a client does not read its replies (the transport's write buffer is over
:data:`WRITE_HIGH_WATER`), no more of its frames are handled and its socket is not read; one
that leaves them unread for ``socket.stalled_timeout`` seconds loses its requests (and their
LLM slots) and its connection.  Connections are bounded per uid, with a reserve for
administrators, and so are requests in flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import json
import logging
import os
import select
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Any

from aiosd.api.socket import STREAM_METHOD
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
from aiosd.managers.access import Caller, Role
from aiosd.managers.users import process_ids

log = logging.getLogger(__name__)

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)

#: A connection's unsent replies, in bytes, above which no more of its frames are handled
#: (asyncio's default, set here so that the bound is ours): what a client that stops reading
#: leaves in the daemon is this, one reply more, and the replies of requests already in
#: flight.  Writing resumes when the client has read it down to a quarter of this.
WRITE_HIGH_WATER = 64 * 1024
#: The audit record of a connection refused or closed by the socket front-end itself.
AUDIT_CONNECTION = "connection"


def peer_caller(sock: socket.socket) -> Caller:
    """The connecting process's identity, from the kernel (SO_PEERCRED, SO_PEERGROUPS)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    groups: set[int] = set()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
        groups = set(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:
        # Kernels before 4.13 lack SO_PEERGROUPS: the peer's own groups are in /proc, a
        # local read (the group database may be NSS over the network: not on the loop).
        groups = set(process_ids(pid).groups)
    return Caller(uid=uid, gid=gid, pid=pid, groups=frozenset(groups))


_to_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents 0755 whatever the umask (the daemon's is
    0077), so that every user can reach the socket; existing ones are left as they are."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir()
            os.chmod(d, 0o755)


def _encode(obj: dict[str, Any]) -> bytes:
    try:
        return _to_json(obj).encode() + b"\n"
    except UnicodeEncodeError:
        # A lone surrogate (a "\udc80" escape echoed back, say) has no UTF-8 form: escape it.
        return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _kind(value: Any) -> str:
    """What a JSON value is, for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a number"
    if isinstance(value, float):
        return "a number written with a fraction or an exponent"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _id_problem(raw_id: Any) -> str | None:
    """What is wrong with a request's id (None: nothing; absent and null are fine)."""
    if raw_id is None:
        return None
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        return f"'id' must be an integer, a string or null, not {_kind(raw_id)}"
    return None


def _request_problem(msg: Any) -> str | None:
    """What keeps a parsed frame from being a JSON-RPC 2.0 request (None: nothing)."""
    if isinstance(msg, list):
        return "batches (JSON arrays of requests) are not supported: send one request per line"
    if not isinstance(msg, dict):
        return f"a request is a JSON object, not {_kind(msg)}"
    if msg.get("jsonrpc") != "2.0":
        return "'jsonrpc' must be \"2.0\"" + (" (it is missing)" if "jsonrpc" not in msg else "")
    if "method" not in msg:
        return "'method' is missing"
    if not isinstance(msg["method"], str):
        return f"'method' must be a string, not {_kind(msg['method'])}"
    return _id_problem(msg.get("id"))


def _parse(line: bytes | bytearray) -> Any:
    """The JSON value of one frame; ParseError naming what is wrong with it."""
    try:
        text = line.decode()  # UTF-8, as JSON on the wire must be
    except UnicodeDecodeError as exc:
        raise ParseError(f"parse error: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"parse error: {exc}") from None
    except RecursionError:
        raise ParseError("parse error: JSON nested too deeply") from None
    except ValueError:  # the only other one: an integer too long to convert
        raise ParseError(
            f"parse error: a number has more than {sys.get_int_max_str_digits()} digits"
        ) from None


def _error(req_id: Any, err: AiosError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": req_id, "error": err.to_rpc()}


def _failure(req_id: Any, method: str, exc: BaseException) -> dict[str, Any]:
    """The error reply for a failed request; an unexpected exception is logged, not shown."""
    if isinstance(exc, AiosError):
        return _error(req_id, exc)
    # stacklevel: the record names the function that handled the request, not this helper.
    log.error("request %r (%s) failed", req_id, method, exc_info=exc, stacklevel=2)
    return _error(req_id, InternalError("internal error; the daemon log has details"))


class SocketServer:
    """The listening socket and its connections."""

    def __init__(self, kernel: Kernel, cfg: SocketConfig, path: Path) -> None:
        self.kernel = kernel
        self.cfg = cfg
        self.path = path
        self.activated = False
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        #: Admitted connections by peer uid (socket.max_connections_per_user).
        self._per_uid: collections.Counter[int] = collections.Counter()
        #: Requests in flight by peer uid, over all its connections (max_inflight_per_user).
        self._inflight: collections.Counter[int] = collections.Counter()
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
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        log.info("listening on %s%s", self.path, " (socket activation)" if self.activated else "")

    def _bind(self) -> socket.socket:
        _make_dirs(self.path.parent)
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
        # And until our side has let it go: the first STATUS= must not count the probe.
        own = [c for c in self._connections if c.caller is not None and c.caller.pid == os.getpid()]
        await asyncio.gather(*(c.finished.wait() for c in own))

    async def stop_accepting(self) -> None:
        """Close the listening socket; established connections keep being served."""
        if self._server is not None:
            self._server.close()
        if not self.activated:
            with contextlib.suppress(OSError):
                self.path.unlink()
        if self._server is not None:
            # Python 3.12+ also waits here for connections to end: the caller bounds it.
            await self._server.wait_closed()

    async def close(self) -> None:
        """Drop every connection (what was already written to them is still sent)."""
        conns = list(self._connections)
        for conn in conns:
            conn.close()
        await asyncio.gather(*(c.finished.wait() for c in conns), return_exceptions=True)

    def peers(self) -> list[str]:
        """The open connections, by peer, for a stop that has to wait on them."""
        out = []
        for conn in self._connections:
            if (c := conn.caller) is not None:  # every admitted connection has one
                out.append(f"uid {c.uid} pid {c.pid} ({len(conn.tasks)} request(s) in flight)")
        return sorted(out)

    def _admit(self, conn: _Connection, peer: Caller) -> Caller | TooManyConnections:
        """Register a new connection and give its caller, or the limit it is over.

        Everyone shares max_connections; users (and callers with no role) are also bound by
        max_connections_per_user and may not take the administrators' reserve.  The role
        comes from the peer's groups as the kernel gave them: no user database look-up.
        """
        cfg = self.cfg
        if self.kernel.access.role(peer) is not Role.admin:
            mine = self._per_uid[peer.uid]
            if mine >= cfg.max_connections_per_user:
                return TooManyConnections(
                    f"uid {peer.uid} already holds {mine} connections "
                    "(socket.max_connections_per_user)",
                    data={"limit": cfg.max_connections_per_user, "scope": "user"},
                )
            shared = cfg.max_connections - cfg.admin_reserved_connections
            if len(self._connections) >= shared:
                return TooManyConnections(
                    f"the daemon already serves {len(self._connections)} connections; the "
                    f"last {cfg.admin_reserved_connections} are kept for administrators "
                    "(socket.max_connections, socket.admin_reserved_connections)",
                    data={"limit": shared, "scope": "users"},
                )
        if len(self._connections) >= cfg.max_connections:
            return TooManyConnections(
                f"the daemon already serves {cfg.max_connections} connections "
                "(socket.max_connections)",
                data={"limit": cfg.max_connections, "scope": "daemon"},
            )
        self._serial += 1
        # Unique across restarts too: a session's pinned memory outlives the daemon.
        session = f"socket-{self._boot}-{self._serial}"
        self._connections.add(conn)
        self._per_uid[peer.uid] += 1
        self._count_connections()
        # Once per connection: which agent (if any) the connecting process is part of, from
        # its ancestry or cgroup as the kernel has it.
        aid = self.kernel.agents.identify(peer.pid, peer.uid)
        return dataclasses.replace(peer, session=session, aid=aid)

    def _release(self, conn: _Connection) -> None:
        if conn in self._connections and conn.caller is not None:
            self._per_uid[conn.caller.uid] -= 1
            if not self._per_uid[conn.caller.uid]:
                del self._per_uid[conn.caller.uid]
        self._connections.discard(conn)
        self._count_connections()

    def _inflight_problem(self, uid: int) -> TooManyRequests | None:
        """The error for one more request in flight of ``uid``, if it is at its limit."""
        limit = self.cfg.max_inflight_per_user
        if self._inflight[uid] < limit:
            return None
        return TooManyRequests(
            f"uid {uid} already has {limit} requests in flight over its connections "
            "(socket.max_inflight_per_user); wait for one to finish",
            data={"limit": limit, "scope": "user"},
        )

    def _started(self, uid: int) -> None:
        self._inflight[uid] += 1

    def _ended(self, uid: int) -> None:
        self._inflight[uid] -= 1
        if not self._inflight[uid]:
            del self._inflight[uid]

    def _count_connections(self) -> None:
        self.kernel.connections = len(self._connections)
        self.kernel.changed()


class _Connection(asyncio.Protocol):
    """One client connection: frames in, replies out, a task for each request that waits."""

    transport: asyncio.WriteTransport

    def __init__(self, server: SocketServer) -> None:
        self.server = server
        self.kernel = server.kernel
        self.limit = server.cfg.max_frame_bytes
        self.caller: Caller | None = None
        self.tasks: set[asyncio.Future[dict[str, Any]]] = set()
        self.finished = asyncio.Event()
        self._buf = bytearray()
        self._scan = 0  # where in _buf a newline may be: the bytes before it have none
        self._eof = False  # the client has sent everything it will
        self._closing = False  # no more frames are handled: closed, or closing once idle
        self._close_when_idle = False
        self._writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._stall: asyncio.TimerHandle | None = None
        self._resume: asyncio.Handle | None = None
        self._cleanup: asyncio.Task[None] | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport
        try:
            peer = peer_caller(transport.get_extra_info("socket"))
        except OSError as exc:  # the peer left before we could read its credentials
            log.debug("dropping a connection without credentials: %s", exc)
            self._closing = True
            transport.abort()
            self.finished.set()
            return
        admitted = self.server._admit(self, peer)
        if isinstance(admitted, TooManyConnections):
            self._closing = True
            self.kernel.access.audit(peer, AUDIT_CONNECTION, "denied", admitted.message)
            self._write(_error(None, admitted))
            transport.close()
            self.finished.set()
            return
        self.caller = admitted
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._buf:
            self._buf += data
            self._take_frames(self._buf)
        else:
            self._take_frames(data)  # no copy of the bytes read unless some are kept

    def _take_frames(self, buf: bytes | bytearray) -> None:
        """Handle the complete frames of ``buf`` (``self._buf``, or bytes just read) until the
        client's replies pile up unread; keep the rest in ``self._buf`` for later."""
        scan = self._scan if buf is self._buf else 0
        start = 0
        # Once writing is paused no frame more is handled, even of bytes already read: what a
        # client that does not read makes the daemon hold stays bounded (WRITE_HIGH_WATER).
        while not self._writing_paused and (end := buf.find(b"\n", scan)) >= 0:
            if end + 1 - start > self.limit:
                self._too_large()
                return
            line = buf[start:end]
            start = scan = end + 1
            if line.strip():
                self._handle_frame(line)
                if self._closing:
                    return
        paused = self._writing_paused
        rest = len(buf) - start
        if not paused and rest >= self.limit:  # with its newline it cannot fit any more
            self._too_large()
            return
        if buf is self._buf:
            del self._buf[:start]
        elif rest:
            self._buf = bytearray(memoryview(buf)[start:])
        self._scan = 0 if paused else rest

    def eof_received(self) -> bool:
        self._eof = True
        if self._writing_paused and self._buf and not self._closing:
            # Frames are still waiting for the client to read its replies: _go_on handles
            # them.  Unless the peer is gone altogether (nobody to answer).
            keep_open = self._peer_still_reads()
        else:
            keep_open = self._end_of_input()
        if not keep_open:
            self._closing = True  # the transport closes; connection_lost follows
        return keep_open

    def _end_of_input(self) -> bool:
        """After the client's last frame: eof_received's answer (True: keep the transport
        open until the answers are written)."""
        if self._buf and not self._closing:
            # A last frame without its newline (``printf … | socat``) is still a frame.
            line, self._buf = bytes(self._buf), bytearray()
            if line.strip():
                self._handle_frame(line)
        if self.tasks and self._peer_still_reads():
            # The client only shut down its writing side: answer what it asked, then close.
            self._closing = self._close_when_idle = True
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        # Senders waiting to write go on (their writes are dropped); _finish cancels them.
        self._wake_senders()
        if self.caller is not None and self._cleanup is None:
            self._cleanup = asyncio.get_running_loop().create_task(self._finish())

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its requests until it does,
        # and give it socket.stalled_timeout seconds before its requests lose their slots.
        self._writing_paused = True
        self.transport.pause_reading()  # type: ignore[attr-defined]
        if self._stall is None:
            timeout = self.server.cfg.stalled_timeout
            self._stall = asyncio.get_running_loop().call_later(timeout, self._stalled)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        self._wake_senders()
        if self._closing:
            return
        if self._buf or self._eof:
            # Frames read before the pause, or the end of input, still to handle: not from
            # inside the transport's write callback (this one), which handling them may close.
            if self._resume is None:
                self._resume = asyncio.get_running_loop().call_soon(self._go_on)
        else:
            self.transport.resume_reading()  # type: ignore[attr-defined]

    def _go_on(self) -> None:
        """After a pause: handle the frames read before it, then read on (or end)."""
        self._resume = None
        if self._closing or self._writing_paused:
            return  # closed meanwhile, or paused again: the next resume_writing comes here
        if self._buf:
            self._take_frames(self._buf)
            if self._closing or self._writing_paused:
                return
        if self._eof:  # every frame of the client is handled now
            if not self._end_of_input():
                self._closing = True
                self.transport.close()
            return
        self.transport.resume_reading()  # type: ignore[attr-defined]

    def _stalled(self) -> None:
        """The client has left its replies unread for socket.stalled_timeout seconds: what
        it holds (LLM slots above all) goes back to the others, and the connection goes."""
        self._stall = None
        c = self.caller
        assert c is not None  # only admitted connections write enough to pause
        timeout = self.server.cfg.stalled_timeout
        log.warning(
            "uid %d pid %d has not read its replies for %g s (socket.stalled_timeout): "
            "closing its connection, %d bytes of replies unread, %d request(s) cancelled",
            c.uid,
            c.pid,
            timeout,
            self.transport.get_write_buffer_size(),
            len(self.tasks),
        )
        self.kernel.access.audit(
            c,
            AUDIT_CONNECTION,
            "closed",
            f"its replies were left unread for {timeout:g} s (socket.stalled_timeout); "
            f"{len(self.tasks)} request(s) cancelled",
        )
        self._closing = True
        # Not close(): that would wait for the unread replies to be flushed, i.e. forever.
        self.transport.abort()

    def _wake_senders(self) -> None:
        """Let every stream waiting in :meth:`_send` go on."""
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # --- the connection's life -----------------------------------------------------------

    def close(self) -> None:
        """Stop reading, cancel every request of this connection, then close it."""
        self._closing = self._close_when_idle = True
        for task in list(self.tasks):
            task.cancel()
        if not self.tasks:
            self.transport.close()

    async def _finish(self) -> None:
        """After the connection is gone: cancel its requests (freeing their slots), end the
        session, and only then say it is finished."""
        try:
            # Shielded: a second cancel (daemon stopping) must not skip the cleanup.
            pending = list(self.tasks)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))
        finally:
            self.server._release(self)
            try:
                assert self.caller is not None
                await self.kernel.session_closed(self.caller)
            finally:
                self.finished.set()

    def _peer_still_reads(self) -> bool:
        """At EOF: did the peer shut down only its writing side (it still reads)?

        A peer that closed or died leaves our socket fully shut down (POLLHUP); one that
        called shutdown(SHUT_WR) does not, and still expects its answers.
        """
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return not any(ev & select.POLLHUP for _, ev in poller.poll(0))

    def _too_large(self) -> None:
        err = FrameTooLarge(
            f"frame larger than {self.limit} bytes (socket.max_frame_bytes); closing",
            data={"limit": self.limit},
        )
        self._write(_error(None, err))
        self._buf = bytearray()
        self.close()

    # --- requests ---------------------------------------------------------------------------

    def _handle_frame(self, line: bytes | bytearray) -> None:
        try:
            msg = _parse(line)
        except ParseError as bad:
            self._write(_error(None, bad))
            return
        raw_id = msg.get("id") if isinstance(msg, dict) else None
        # An id is a string, an integer (bool is not one) or null; absent means a notification.
        req_id = raw_id if _id_problem(raw_id) is None else None
        if (problem := _request_problem(msg)) is not None:
            self._write(_error(req_id, InvalidRequest(f"invalid request: {problem}")))
            return
        assert self.caller is not None
        notify_only = "id" not in msg
        method = msg["method"]
        spec = self.kernel.syscalls.get(method)
        if spec is not None and spec.waits:
            # Only a request that waits is in flight (and bounded): one that answers at once,
            # or an error reply, holds nothing once its reply is written.
            if (err := self._inflight_problem()) is not None:
                self._write(_error(req_id, err))
                return

        async def emit(note: dict[str, Any]) -> None:
            if not notify_only:
                await self._send(
                    {"jsonrpc": "2.0", "method": STREAM_METHOD, "params": {"id": req_id, **note}}
                )

        try:
            out = self.kernel.dispatch(method, msg.get("params"), self.caller, emit)
        except Exception as exc:
            reply = _failure(req_id, method, exc)
        else:
            if not out.done():
                # The syscall waits: its task finishes it, and its completion writes the reply.
                self.tasks.add(out)
                self.server._started(self.caller.uid)
                out.add_done_callback(
                    lambda t: self._reply_when_done(t, req_id, method, notify_only)
                )
                return
            reply = {"jsonrpc": "2.0", "id": req_id, "result": out.result()}
        if not notify_only:
            self._write(reply)

    def _inflight_problem(self) -> TooManyRequests | None:
        """The error for one more request in flight on this connection, if it is at a limit."""
        limit = self.server.cfg.max_inflight_per_connection
        if len(self.tasks) >= limit:
            return TooManyRequests(
                f"this connection already has {limit} requests in flight "
                "(socket.max_inflight_per_connection); wait for one to finish",
                data={"limit": limit, "scope": "connection"},
            )
        assert self.caller is not None
        return self.server._inflight_problem(self.caller.uid)

    def _reply_when_done(
        self, task: asyncio.Future[dict[str, Any]], req_id: Any, method: str, notify_only: bool
    ) -> None:
        self.tasks.discard(task)
        assert self.caller is not None
        self.server._ended(self.caller.uid)
        try:
            self._reply_for(task, req_id, method, notify_only)
        finally:
            if self._close_when_idle and not self.tasks:
                self.transport.close()

    def _reply_for(
        self, task: asyncio.Future[dict[str, Any]], req_id: Any, method: str, notify_only: bool
    ) -> None:
        reply: dict[str, Any] | None
        if task.cancelled():
            # Cut off by the stop's drain timeout: tell the client rather than go silent.
            reply = None
            if self.kernel.state == "stopping":
                err = ShuttingDown("the daemon stopped before this request finished")
                reply = _error(req_id, err)
        elif (exc := task.exception()) is None:
            reply = {"jsonrpc": "2.0", "id": req_id, "result": task.result()}
        else:
            reply = _failure(req_id, method, exc)
        if reply is not None and not notify_only:
            self._write(reply)

    def _write(self, obj: dict[str, Any]) -> None:
        if not self.transport.is_closing():
            self.transport.write(_encode(obj))

    async def _send(self, obj: dict[str, Any]) -> None:
        """Write, then wait while the client is not reading (a stream's flow control)."""
        self._write(obj)
        if self._writing_paused and not self.transport.is_closing():
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter

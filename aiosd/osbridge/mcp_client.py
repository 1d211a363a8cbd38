"""MCP servers as a user's processes: started as that user, spoken to over stdio.

A server is started like an agent or a worker, through
:func:`aiosd.osbridge.executor.confined_argv` (the user's uid, gid and groups, no
capabilities, no new privileges, SIGKILL when the daemon dies), in a session of its own, with
a clean environment and umask 077, in ``/``.  The daemon speaks MCP to it
with the ``mcp`` SDK's :class:`mcp.ClientSession`, over the process's stdin and stdout (one
JSON-RPC message per line, as MCP's stdio transport has it); what it writes on stderr is kept
(the last lines) for the message when it fails.

A session lives in a task of its own (the SDK's sessions are used inside an ``async with``);
calls from any task go through it.  A server that dies is reported, and forgotten: the next
use starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import signal
from typing import Any

import anyio
from mcp import ClientSession, types
from mcp.shared.message import SessionMessage

from aiosd.osbridge.executor import UnixAccount, start_piped, user_environment

log = logging.getLogger(__name__)

#: Bytes of a server's stderr kept for the message when it fails.
STDERR_KEPT = 4096
#: The code of the error the SDK raises when a request's read timeout passes (HTTP's 408).
REQUEST_TIMEOUT = 408
#: Bytes of one message from a server at most.
LINE_LIMIT = 16 << 20


class McpFailed(Exception):
    """The server could not be used (it would not start, it died, it did not answer)."""


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """How to run one MCP server."""

    name: str
    command: list[str]
    env: dict[str, str]
    #: Its tools' annotations are believed (set by an administrator only).
    trusted: bool
    #: "system" (aiosd.toml) or "user" (the user's own file).
    origin: str


class McpServer:
    """One running MCP server of one user."""

    def __init__(self, spec: ServerSpec, account: UnixAccount) -> None:
        self.spec = spec
        self.account = account
        self.tools: list[types.Tool] = []
        self.stderr = b""
        self.session: ClientSession | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stop = asyncio.Event()
        self.last_used = 0.0

    @property
    def alive(self) -> bool:
        return (
            self._task is not None
            and not self._task.done()
            and self.proc is not None
            and self.proc.returncode is None
        )

    async def start(self, timeout: float) -> None:
        """Start the server, initialize the session, list its tools; McpFailed if not."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._task = loop.create_task(
            self._run(), name=f"mcp {self.spec.name} ({self.account.name})"
        )
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._ready)
        except TimeoutError:
            await self.close()
            raise McpFailed(f"it did not start within {timeout:g} s{self._said()}") from None
        except McpFailed:
            await self.close()
            raise

    async def _ended_status(self) -> int | None:
        """The exit status, once the process has ended (waiting a moment for it)."""
        if self.proc is None:
            return None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self.proc.wait()
        return self.proc.returncode

    async def _failure(self, exc: BaseException) -> McpFailed:
        """Why the server could not be used, in words: its end if it ended, else the
        (innermost) error."""
        if isinstance(exc, McpFailed):
            return exc
        status = await self._ended_status()
        if status is not None:
            how = f"killed by signal {-status}" if status < 0 else f"status {status}"
            return McpFailed(f"it ended ({how}){self._said()}")
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        return McpFailed(f"{type(exc).__name__}: {exc}")

    def _said(self) -> str:
        lines = self.stderr.decode(errors="replace").strip().splitlines()
        return f" (it said: {lines[-1]})" if lines else ""

    async def _run(self) -> None:
        assert self._ready is not None
        try:
            await self._serve()
        except Exception as exc:
            if not self._ready.done():
                self._ready.set_exception(await self._failure(exc))
            else:
                log.warning(
                    "MCP server %s of %s failed: %r", self.spec.name, self.account.name, exc
                )
        finally:
            if not self._ready.done():
                self._ready.set_exception(McpFailed(f"it ended at once{self._said()}"))
            self.session = None
            self._kill()

    async def _serve(self) -> None:
        env = user_environment(self.account, self.spec.env, {})
        try:
            self.proc = await start_piped(self.account, self.spec.command, env, LINE_LIMIT)
        except OSError as exc:
            raise McpFailed(f"cannot start {self.spec.command[0]}: {exc.strerror}") from None
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        read_w, read_r = anyio.create_memory_object_stream[SessionMessage | Exception](16)
        write_w, write_r = anyio.create_memory_object_stream[SessionMessage](16)

        async def from_server() -> None:
            assert proc.stdout is not None
            async with read_w:
                while line := await proc.stdout.readline():
                    try:
                        msg = types.JSONRPCMessage.model_validate_json(line)
                    except Exception as exc:  # what the SDK does: hand it to the session
                        await read_w.send(exc)
                        continue
                    await read_w.send(SessionMessage(msg))

        async def to_server() -> None:
            assert proc.stdin is not None
            async with write_r:
                async for sm in write_r:
                    text = sm.message.model_dump_json(by_alias=True, exclude_none=True)
                    proc.stdin.write(text.encode() + b"\n")
                    await proc.stdin.drain()

        async def keep_stderr() -> None:
            assert proc.stderr is not None
            while chunk := await proc.stderr.read(4096):
                self.stderr = (self.stderr + chunk)[-STDERR_KEPT:]

        pumps = [
            asyncio.get_running_loop().create_task(f())
            for f in (from_server, to_server, keep_stderr)
        ]
        try:
            async with ClientSession(read_r, write_w) as session:
                await session.initialize()
                listed = await session.list_tools()
                self.tools = list(listed.tools)
                self.session = session
                assert self._ready is not None
                self._ready.set_result(None)
                log.info(
                    "MCP server %s started for %s (pid %d, %d tools)",
                    self.spec.name,
                    self.account.name,
                    proc.pid,
                    len(self.tools),
                )
                ended = asyncio.ensure_future(proc.wait())
                stop = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait({ended, stop}, return_when=asyncio.FIRST_COMPLETED)
                ended.cancel()
                stop.cancel()
        finally:
            for p in pumps:
                p.cancel()

    async def call(
        self, tool: str, arguments: dict[str, Any], timeout: float
    ) -> types.CallToolResult:
        """One call of one of its tools; McpFailed if the server could not answer."""
        session = self.session
        if session is None or not self.alive:
            raise McpFailed(f"it is not running{self._said()}")
        self.last_used = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(timeout + 1):
                return await session.call_tool(
                    tool, arguments, read_timeout_seconds=datetime.timedelta(seconds=timeout)
                )
        except TimeoutError:
            await self.close()
            raise McpFailed(f"no answer within {timeout:g} s: stopped") from None
        except Exception as exc:
            if isinstance(exc, McpFailed):
                raise
            code = getattr(getattr(exc, "error", None), "code", None)
            if not self.alive or code == types.CONNECTION_CLOSED:
                raise await self._failure(exc) from None
            if code == REQUEST_TIMEOUT:  # the SDK's own read timeout: as ours
                await self.close()
                raise McpFailed(f"no answer within {timeout:g} s: stopped") from None
            # An MCP error (for instance the server's refusal of the arguments).
            message = getattr(getattr(exc, "error", None), "message", None) or str(exc)
            raise McpFailed(f"it answered with an error: {message}") from None

    def _kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Stop the server."""
        self._stop.set()
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
        if self._task is not None:
            try:
                async with asyncio.timeout(2.0):
                    await asyncio.shield(self._task)
            except (TimeoutError, Exception):
                self._kill()
                self._task.cancel()
        self._kill()

"""MCP servers as a source of tools: each user's instances, started lazily as that user.

Servers come from two places: the administrator's (``[tools.mcp.NAME]`` in aiosd.toml: for
everyone, each user getting an instance of their own) and each user's own
(``~/.config/aiosd/mcp.toml``, ``[servers.NAME]`` tables; read by the user's worker, so as the
user).  A user's server of the same name as a system one is not used (the administrator's
wins, and the problem is reported).  Each tool is listed as ``SERVER.TOOL``.

A server is started the first time the user's tools are listed or one of its tools is
called, kept while it is used, stopped after ``tools.worker_idle_timeout`` seconds idle, and
started again after it dies.  At most ``tools.max_mcp_servers_per_user`` run for one user.

What a server says of its tools is not trusted: unless the administrator marks the server
``trusted``, every tool of it is taken as destructive and open-world (the strictest reading),
so its calls wait for consent under the default policy; a trusted server's annotations are
read as MCP defines them (absent hints: not read-only, destructive, open-world).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import tomllib
from collections.abc import Callable
from typing import Any

from aiosd.config import MCP_SERVER_NAME, RESERVED_TOOL_PREFIXES, ToolsConfig
from aiosd.managers.access import Caller
from aiosd.managers.tools import Annotations, Context, Tool, ToolFailure
from aiosd.osbridge.executor import AccountRef
from aiosd.osbridge.mcp_client import McpFailed, McpServer, ServerSpec
from aiosd.osbridge.workers import WorkerFailed, WorkerPool

log = logging.getLogger(__name__)

#: Where a user keeps their own servers (under their home; read as them).
USER_CONFIG = "~/.config/aiosd/mcp.toml"
#: Server names: they prefix their tools' names.
SERVER_NAME = re.compile(MCP_SERVER_NAME)
TOOL_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}$")
#: Prefixes of the built-in tools, which no server may take.
RESERVED = frozenset(RESERVED_TOOL_PREFIXES)
#: Seconds a user's listing serves the calls of their tools (tool.list always lists anew).
LISTING_TTL = 5.0
#: Characters of a tool description kept.
DESCRIPTION_CHARS = 1024
STRICTEST = Annotations(read_only=False, destructive=True, open_world=True, idempotent=False)


def annotations_of(tool: Any, trusted: bool) -> Annotations:
    """How policy reads an MCP tool: its hints if the server is trusted, else the strictest."""
    hints = getattr(tool, "annotations", None)
    if not trusted or hints is None:
        return STRICTEST

    def hint(name: str, default: bool) -> bool:
        value = getattr(hints, name, None)
        return default if value is None else bool(value)

    read_only = hint("readOnlyHint", False)
    return Annotations(
        read_only=read_only,
        destructive=False if read_only else hint("destructiveHint", True),
        open_world=hint("openWorldHint", True),
        idempotent=hint("idempotentHint", False),
    )


def output_of(result: Any) -> dict[str, Any]:
    """A CallToolResult as a tool's output: its content (text, and what else it holds, by
    type) and its structured content; ToolFailure when the server says the call failed."""
    content: list[dict[str, Any]] = []
    for item in result.content or []:
        kind = getattr(item, "type", "?")
        if kind == "text":
            content.append({"type": "text", "text": item.text})
        elif kind in ("image", "audio"):
            content.append({"type": kind, "mime_type": item.mimeType, "bytes": len(item.data)})
        else:
            content.append({"type": kind})
    if result.isError:
        text = " ".join(c.get("text", "") for c in content if c["type"] == "text")
        raise ToolFailure("mcp", text.strip() or "the server says the call failed")
    out: dict[str, Any] = {"content": content}
    if getattr(result, "structuredContent", None) is not None:
        out["structured"] = result.structuredContent
    return out


def _words(value: Any) -> bool:
    """Whether ``value`` is a command line: a non-empty list of non-empty strings."""
    return isinstance(value, list) and bool(value) and all(isinstance(a, str) and a for a in value)


class McpTools:
    """Every user's MCP servers, and the tools they give."""

    def __init__(
        self,
        cfg: Callable[[], ToolsConfig],
        workers: WorkerPool,
        account_of: Callable[[int], Any],
    ) -> None:
        self._cfg = cfg
        self.workers = workers
        #: uid → UnixAccount (awaitable: NSS off the loop).
        self._account_of = account_of
        self._servers: dict[tuple[int, str], McpServer] = {}
        #: uid → (when, tools, problems) of the last listing.
        self._listed: dict[int, tuple[float, list[Tool], list[str]]] = {}
        self._starting: dict[tuple[int, str], asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None

    async def _specs(self, account: AccountRef) -> tuple[list[ServerSpec], list[str]]:
        """The servers ``account`` has: the system's and their own; problems found."""
        cfg = self._cfg()
        problems: list[str] = []
        specs = [
            ServerSpec(name, list(s.command), dict(s.env), s.trusted, "system")
            for name, s in sorted(cfg.mcp.items())
        ]
        try:
            reply = await self.workers.call(
                account,
                False,
                "fs.read",
                {"path": USER_CONFIG, "max_bytes": 65536, "offset": 0},
                cfg.call_timeout,
            )
        except (WorkerFailed, Exception) as exc:  # no worker: only the system's servers
            return specs, [f"{USER_CONFIG}: not read: {exc}"]
        if "error" in reply:
            e = reply["error"]
            if e.get("code") != "ENOENT":
                problems.append(f"{USER_CONFIG}: {e.get('message')}")
            return specs, problems
        text = reply["result"]["text"]
        try:
            mine = tomllib.loads(text).get("servers", {})
        except tomllib.TOMLDecodeError as exc:
            return specs, [f"{USER_CONFIG}: not TOML: {exc}"]
        taken = {s.name for s in specs}
        for name, table in sorted(mine.items() if isinstance(mine, dict) else []):
            where = f"{USER_CONFIG}: [servers.{name}]"
            command = table.get("command") if isinstance(table, dict) else None
            env = table.get("env", {}) if isinstance(table, dict) else None
            if not SERVER_NAME.match(name) or name in RESERVED:
                problems.append(f"{where}: a server name is 1-32 of a-z 0-9 _ - and not "
                                f"one of {', '.join(sorted(RESERVED))}")  # fmt: skip
            elif name in taken:
                problems.append(f"{where}: the system has a server of that name: yours is not used")
            elif not _words(command):
                problems.append(f"{where}: command must be a list of words, the program first")
            elif not (isinstance(env, dict) and all(isinstance(v, str) for v in env.values())):
                problems.append(f"{where}: env must be a table of strings")
            else:
                specs.append(
                    ServerSpec(name, [str(a) for a in command or []], dict(env), False, "user")
                )
        return specs, problems

    async def _server(self, spec: ServerSpec, account: AccountRef) -> McpServer:
        """The running instance of ``spec`` for ``account`` (started if it is not)."""
        key = (account.uid, spec.name)
        lock = self._starting.setdefault(key, asyncio.Lock())
        async with lock:
            server = self._servers.get(key)
            if server is not None and server.alive and server.spec == spec:
                server.last_used = time.monotonic()
                return server
            if server is not None:
                await server.close()
                del self._servers[key]
            cfg = self._cfg()
            mine = sum(1 for (uid, _) in self._servers if uid == account.uid)
            if mine >= cfg.max_mcp_servers_per_user:
                raise McpFailed(
                    f"you already run {mine} MCP servers (tools.max_mcp_servers_per_user)"
                )
            server = McpServer(spec, await account.get())
            await server.start(cfg.mcp_start_timeout)
            server.last_used = time.monotonic()
            self._servers[key] = server
            self._arm_reaper()
            return server

    async def tools(self, caller: Caller, fresh: bool = True) -> tuple[list[Tool], list[str]]:
        """The MCP tools of ``caller``, and what went wrong finding them.  With ``fresh``
        false (a call of one tool), a listing at most :data:`LISTING_TTL` seconds old
        serves, if its servers still run."""
        kept = self._listed.get(caller.uid)
        if not fresh and kept is not None and time.monotonic() - kept[0] < LISTING_TTL:
            return kept[1], kept[2]
        listed = await self._list(caller)
        self._listed[caller.uid] = (time.monotonic(), *listed)
        return listed

    async def _list(self, caller: Caller) -> tuple[list[Tool], list[str]]:
        account = AccountRef(caller.uid, self._account_of)
        specs, problems = await self._specs(account)
        out: list[Tool] = []
        for spec in specs:
            try:
                server = await self._server(spec, account)
            except McpFailed as exc:
                problems.append(f"MCP server {spec.name} ({spec.origin}): {exc}")
                continue
            for t in server.tools:
                made = self._tool(spec, t, problems)
                if made is not None:
                    out.append(made)
        return out, problems

    def _tool(self, spec: ServerSpec, t: Any, problems: list[str]) -> Tool | None:
        name = f"{spec.name}.{t.name}"
        if not TOOL_NAME.match(str(t.name)):
            problems.append(f"MCP server {spec.name}: tool {t.name!r}: its name is not usable")
            return None
        schema = t.inputSchema if isinstance(t.inputSchema, dict) else {"type": "object"}
        try:
            import jsonschema

            jsonschema.Draft202012Validator.check_schema(schema)
        except Exception as exc:
            problems.append(
                f"MCP server {spec.name}: tool {t.name}: its schema is not valid: {exc}"
            )
            return None
        remote = str(t.name)

        async def run(ctx: Context, arguments: dict[str, Any]) -> dict[str, Any]:
            try:
                server = await self._server(spec, ctx.account)
                result = await server.call(remote, arguments, ctx.timeout)
            except McpFailed as exc:
                raise ToolFailure("mcp", f"MCP server {spec.name}: {exc}") from None
            server.last_used = time.monotonic()
            return output_of(result)

        return Tool(
            name,
            (t.description or "")[:DESCRIPTION_CHARS],
            None,
            annotations_of(t, spec.trusted),
            run,
            source=f"mcp:{spec.name}",
            as_user=True,
            json_schema=schema,
        )

    # --- idle servers -------------------------------------------------------------------------

    def _arm_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while self._servers:
            idle_for = self._cfg().worker_idle_timeout
            now = time.monotonic()
            for key, server in list(self._servers.items()):
                if not server.alive or now - server.last_used >= idle_for:
                    del self._servers[key]
                    await server.close()
            await asyncio.sleep(min(idle_for, 5.0))

    async def close(self) -> None:
        """Stop every server (the daemon stops)."""
        if self._reaper is not None:
            self._reaper.cancel()
        servers = list(self._servers.values())
        self._servers.clear()
        await asyncio.gather(*(s.close() for s in servers), return_exceptions=True)

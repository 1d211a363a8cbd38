"""``aiosctl mcp serve``: the caller's aiosd as an MCP server on stdin and stdout.

An MCP host the user already runs (an editor, a desktop assistant) starts ``aiosctl mcp
serve`` as one of its stdio servers; the host then sees the user's aiosd tools (everything
``tool.list`` gives them: the OS bridge, their storage and memory, their MCP servers' tools)
and ``aiosd_ask``, a question to one of aiosd's models.  aiosctl runs as the user and talks
to aiosd over its socket, so every call is the user's own: same rights, same consent, same
audit.  A call that needs the user's confirmation waits for it; since stdin and stdout carry
MCP, aiosctl says on stderr how to answer (``aiosctl tool confirm ID yes``, or the desktop).

MCP hosts commonly allow only ``[A-Za-z0-9_-]`` in tool names, so ``fs.read`` is offered as
``fs_read``; the names are mapped back when called.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
from typing import Any

from aiosd import __version__
from aiosd.cli.tools import format_request
from aiosd.errors import AiosError
from aiosd.sdk.client import SyscallClient

ASK = "aiosd_ask"
ASK_SCHEMA = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "minLength": 1, "description": "the question"},
        "model": {"type": "string", "description": "a configured model (default: aiosd's)"},
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4096},
    },
    "required": ["prompt"],
    "additionalProperties": False,
}


def exposed(name: str) -> str:
    """A tool's name as MCP hosts accept it: ``fs.read`` → ``fs_read``."""
    return name.replace(".", "_")


class Bridge:
    """One connection to aiosd, used by one call at a time (MCP calls may overlap)."""

    def __init__(self, client: SyscallClient) -> None:
        self.client = client
        self.lock = threading.Lock()
        self.names: dict[str, str] = {}

    def _call(self, method: str, params: dict[str, Any]) -> Any:
        with self.lock:
            return self.client.call(method, params)

    def _stream(self, method: str, params: dict[str, Any]) -> Any:
        with self.lock:
            for note in self.client.stream(method, params):
                req = note.get("confirm")
                if isinstance(req, dict):
                    print(
                        f"{format_request(req)}\naiosctl mcp serve: waiting for your answer: "
                        f"aiosctl tool confirm {req['id']} yes|no",
                        file=sys.stderr,
                        flush=True,
                    )
            return self.client.last_result

    def list_tools(self) -> list[dict[str, Any]]:
        tools: list[dict[str, Any]] = self._call("tool.list", {})["tools"]
        self.names = {exposed(t["name"]): t["name"] for t in tools}
        return tools

    def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        if name not in self.names:
            self.list_tools()
        real = self.names.get(name, name)
        result: dict[str, Any] = self._stream(
            "tool.call", {"name": real, "arguments": arguments, "stream": True}
        )
        return result

    def ask(self, arguments: dict[str, Any]) -> str:
        params: dict[str, Any] = {"messages": [{"role": "user", "content": arguments["prompt"]}]}
        for key in ("model", "max_tokens"):
            if key in arguments:
                params[key] = arguments[key]
        return str(self._call("llm.chat", params)["message"]["content"])


def mcp_serve(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl mcp serve."""
    import anyio
    import mcp.server.stdio
    from mcp import types
    from mcp.server.lowlevel import Server

    bridge = Bridge(client)
    server: Server[Any, Any] = Server("aiosd", version=__version__)

    @server.list_tools()  # type: ignore[untyped-decorator, no-untyped-call]
    async def list_tools() -> list[types.Tool]:
        tools = await asyncio.to_thread(bridge.list_tools)
        out = [
            types.Tool(
                name=exposed(t["name"]),
                description=t["description"],
                inputSchema=t["parameters"],
                annotations=types.ToolAnnotations(
                    readOnlyHint=t["annotations"]["read_only"],
                    destructiveHint=t["annotations"]["destructive"],
                    idempotentHint=t["annotations"]["idempotent"],
                    openWorldHint=t["annotations"]["open_world"],
                ),
            )
            for t in tools
        ]
        out.append(
            types.Tool(
                name=ASK,
                description="Ask one of aiosd's language models a question; its answer.",
                inputSchema=ASK_SCHEMA,
                annotations=types.ToolAnnotations(readOnlyHint=True, openWorldHint=False),
            )
        )
        return out

    @server.call_tool()  # type: ignore[untyped-decorator]
    async def call_tool(name: str, arguments: dict[str, Any]) -> list[types.TextContent]:
        try:
            if name == ASK:
                text = await asyncio.to_thread(bridge.ask, arguments)
                return [types.TextContent(type="text", text=text)]
            result = await asyncio.to_thread(bridge.call, name, arguments)
        except AiosError as exc:
            raise RuntimeError(exc.message) from None  # the SDK makes it an error result
        if not result["ok"]:
            raise RuntimeError(result["error"]["message"])
        text = json.dumps(result["output"], ensure_ascii=False)
        return [types.TextContent(type="text", text=text)]

    async def main() -> None:
        async with mcp.server.stdio.stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())

    anyio.run(main)
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``aiosctl mcp``."""
    mc = sub.add_parser("mcp", parents=[common], help="aiosd and the Model Context Protocol")
    mv = mc.add_subparsers(dest="mcp_command", metavar="VERB", required=True)
    serve = mv.add_parser(
        "serve",
        parents=[common],
        help="be an MCP server (stdio) giving your aiosd tools, storage, memory and models",
        description="Speak MCP on stdin and stdout, as a stdio server of an MCP host: the "
        "host sees your aiosd tools and aiosd_ask, and every call is yours.",
    )
    serve.set_defaults(func=mcp_serve)

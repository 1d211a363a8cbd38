"""A small MCP server (stdio) for the tests, written with the ``mcp`` SDK.

Run as ``python tests/mcp_server.py``.  Its tools tell who runs them and what they can do:
``whoami`` (the process's ids), ``echo``, ``read_file`` (as the server's user), ``write_note``
(a destructive one), ``fail`` (always an error result), ``sleep``, ``crash`` (the process
exits).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from mcp.server.fastmcp import FastMCP
from mcp.types import ToolAnnotations

server = FastMCP("aiosd-test-server")


@server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
def whoami() -> dict[str, object]:
    """Who runs this server: uid, euid, gid, groups, pid."""
    return {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "groups": sorted(os.getgroups()),
        "pid": os.getpid(),
    }


@server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
def echo(text: str, times: int = 1) -> str:
    """The text, repeated."""
    return text * times


@server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
def read_file(path: str) -> str:
    """A file's text, read by this server's process."""
    return Path(path).read_text()


@server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True))
def write_note(path: str, text: str) -> str:
    """Write text to a new file."""
    with open(path, "x") as f:
        f.write(text)
    return f"wrote {len(text)} characters"


@server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
def fail() -> str:
    """Always fails."""
    raise ValueError("this tool always fails")


@server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
def sleep(seconds: float) -> str:
    """Answer after a while."""
    time.sleep(seconds)
    return "awake"


@server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
def crash() -> str:
    """The server process exits at once."""
    os._exit(3)


if __name__ == "__main__":
    server.run()

"""The ``rpc`` baseline: a raw asyncio Unix-socket JSON-RPC echo server.

    python bench/echo_server.py SOCKET_PATH

Reads one JSON object per line, parses it and answers one JSON line echoing the method and
params as the result — the least a JSON-RPC-over-Unix-socket server on asyncio must do.
Sends READY=1 to $NOTIFY_SOCKET once listening; stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            msg = json.loads(line)
            reply = {
                "jsonrpc": "2.0",
                "id": msg.get("id"),
                "result": {"method": msg.get("method"), "params": msg.get("params")},
            }
            writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _notify_ready() -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if addr:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", addr)


async def main(path: Path) -> None:
    """Serve until SIGTERM."""
    path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(_serve_one, path=str(path))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    _notify_ready()
    async with server:
        await stop.wait()
    path.unlink(missing_ok=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))

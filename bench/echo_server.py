"""The ``rpc`` baseline: a raw asyncio Unix-socket JSON-RPC echo server.

    python bench/echo_server.py SOCKET_PATH [--protocol]

Reads one JSON object per line, parses it and answers one JSON line echoing the method and
params as the result — the least a JSON-RPC-over-Unix-socket server on asyncio must do.
By default it uses asyncio streams (a reader coroutine per connection, ``readline`` and
``drain``), the baseline of the goal; with ``--protocol`` it is an ``asyncio.Protocol``
answering inside ``data_received``, as the daemon's socket layer does: a stricter reference.
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
            writer.write(_reply(line))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _reply(line: bytes) -> bytes:
    msg = json.loads(line)
    reply = {
        "jsonrpc": "2.0",
        "id": msg.get("id"),
        "result": {"method": msg.get("method"), "params": msg.get("params")},
    }
    return json.dumps(reply, separators=(",", ":")).encode() + b"\n"


class _EchoProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:
            self.transport.write(_reply(line))


def _notify_ready() -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if addr:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", addr)


async def main(path: Path, protocol: bool) -> None:
    """Serve until SIGTERM."""
    path.unlink(missing_ok=True)
    if protocol:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(_EchoProtocol, path=str(path))
    else:
        server = await asyncio.start_unix_server(_serve_one, path=str(path))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    _notify_ready()
    async with server:
        await stop.wait()
    path.unlink(missing_ok=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), "--protocol" in sys.argv[2:]))

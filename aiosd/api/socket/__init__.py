"""The Unix-socket JSON-RPC 2.0 front-end."""

from __future__ import annotations

from pathlib import Path

#: The method of the notifications that carry a streaming request's pieces.
STREAM_METHOD = "stream"

#: Where the daemon listens unless configured otherwise, and where clients look: the one
#: definition of the default socket (systemd's RuntimeDirectory=aiosd, then aiosd.sock).
DEFAULT_RUNTIME_DIRECTORY = Path("/run/aiosd")
SOCKET_NAME = "aiosd.sock"
DEFAULT_SOCKET = DEFAULT_RUNTIME_DIRECTORY / SOCKET_NAME

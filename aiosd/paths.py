"""Where aiosd lives on a system, defined once for the daemon and its clients."""

from __future__ import annotations

from pathlib import Path

#: The runtime directory (systemd's RuntimeDirectory=aiosd) unless configured otherwise.
DEFAULT_RUNTIME_DIRECTORY = Path("/run/aiosd")
SOCKET_NAME = "aiosd.sock"
#: Where the daemon listens unless configured otherwise, and where clients look.
DEFAULT_SOCKET = DEFAULT_RUNTIME_DIRECTORY / SOCKET_NAME

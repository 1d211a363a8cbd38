"""The ``dbus`` baseline: a raw pydbus service answering ``Status`` with a fixed dictionary.

    python bench/dbus_echo.py BUS_ADDRESS

Publishes ``org.aiosd.BenchEcho`` at ``/org/aiosd/BenchEcho`` with one method, ``Status() ->
a{sv}``, returning a dictionary shaped like aiosd's status — the least a pydbus service must
do per call.  Sends READY=1 to $NOTIFY_SOCKET once it owns its name; stops on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

import pydbus
from gi.repository import GLib

STATUS = {
    "version": GLib.Variant("s", "0.1.0"),
    "pid": GLib.Variant("x", os.getpid()),
    "uptime_s": GLib.Variant("d", 1.0),
    "state": GLib.Variant("s", "running"),
    "models": GLib.Variant("as", ["smollm2"]),
    "default_model": GLib.Variant("s", "smollm2"),
    "running": GLib.Variant("x", 0),
    "waiting": GLib.Variant("x", 0),
    "connections": GLib.Variant("x", 0),
    "caller_uid": GLib.Variant("x", 0),
    "caller_role": GLib.Variant("s", "admin"),
}


class Echo:
    """<node><interface name="org.aiosd.BenchEcho">
      <method name="Status"><arg name="result" type="a{sv}" direction="out"/></method>
    </interface></node>"""

    def Status(self) -> dict[str, Any]:  # noqa: N802 - D-Bus method name
        """Answer at once."""
        return STATUS


def main(address: str) -> None:
    """Serve until SIGTERM."""
    bus = pydbus.connect(address)
    bus.publish("org.aiosd.BenchEcho", ("/org/aiosd/BenchEcho", Echo()))
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    addr = os.environ.get("NOTIFY_SOCKET")
    if addr:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", addr)
    loop.run()


if __name__ == "__main__":
    main(sys.argv[1])

"""``notify.send`` reaches the caller's own desktop session (issue 11), as the caller.

alice (``in``) gets a session bus of her own at ``/run/user/UID/bus`` (a real
``dbus-daemon --session`` run as her) with a notification server on it (a small
``org.freedesktop.Notifications`` written with Gio, run as her): her ``notify.send`` is
delivered there by her worker.  bob (``in2``) has no session: his call says so, and nothing
reaches hers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import UnixUser
from tests.support import Daemon, module_daemon, user_connections, wait_until

pytestmark = pytest.mark.e2e

#: A notification server: prints each Notify call as a JSON line, answers id 7.
SERVER = r"""
import json, sys
from gi.repository import Gio, GLib
XML = '''<node><interface name="org.freedesktop.Notifications">
<method name="Notify"><arg type="s" direction="in"/><arg type="u" direction="in"/>
<arg type="s" direction="in"/><arg type="s" direction="in"/><arg type="s" direction="in"/>
<arg type="as" direction="in"/><arg type="a{sv}" direction="in"/><arg type="i" direction="in"/>
<arg type="u" direction="out"/></method></interface></node>'''
bus = Gio.DBusConnection.new_for_address_sync(sys.argv[1],
    Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
    None, None)
def call(con, sender, path, iface, method, params, inv):
    app, _, _, summary, body, _, hints, timeout = params.unpack()
    print(json.dumps({"app": app, "summary": summary, "body": body,
                      "urgency": hints.get("urgency")}), flush=True)
    inv.return_value(GLib.Variant("(u)", (7,)))
info = Gio.DBusNodeInfo.new_for_xml(XML).interfaces[0]
bus.register_object("/org/freedesktop/Notifications", info, call, None, None)
bus.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
    "RequestName", GLib.Variant("(su)", ("org.freedesktop.Notifications", 4)), None, 0, -1, None)
print("ready", flush=True)
GLib.MainLoop().run()
"""


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with module_daemon("aiosd-notify-") as d:
        yield d


@pytest.fixture
def users(daemon: Daemon, unix_users: dict[str, UnixUser]) -> Iterator[Any]:
    with user_connections(daemon, unix_users) as open_:
        yield open_


def _as(user: UnixUser, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv, user=user.uid, group=user.gid, extra_groups=user.groups, cwd="/", text=True, **kw
    )


@pytest.fixture
def session(unix_users: dict[str, UnixUser]) -> Iterator[subprocess.Popen[str]]:
    """alice's session bus at /run/user/UID/bus and a notification server on it."""
    a = unix_users["in"]
    runtime = Path(f"/run/user/{a.uid}")
    if runtime.exists():
        pytest.fail(f"{runtime} exists: this test makes alice's session itself")
    runtime.mkdir(mode=0o700, parents=True)
    os.chown(runtime, a.uid, a.gid)
    address = f"unix:path={runtime}/bus"
    bus = _as(a, ["dbus-daemon", "--session", f"--address={address}", "--nofork"],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    server = None
    try:
        wait_until(lambda: (runtime / "bus").exists(), 10, "alice's session bus")
        env = {"PATH": "/usr/bin:/bin", "HOME": "/"}
        server = _as(a, [sys.executable, "-I", "-c", SERVER, address], env=env,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        assert server.stdout is not None
        ready = server.stdout.readline().strip()
        assert ready == "ready", server.stderr.read() if server.stderr else ""
        yield server
    finally:
        for p in (server, bus):
            if p is not None:
                p.kill()
                p.wait()
        shutil.rmtree(runtime, ignore_errors=True)


def test_her_notification_reaches_her_desktop_and_bobs_says_no_session(
    users: Any, session: subprocess.Popen[str], unix_users: dict[str, UnixUser]
) -> None:
    sent = users("in").call(
        "tool.call",
        {"name": "notify.send",
         "arguments": {"summary": "Backup done", "body": "3 files", "urgency": "low"}},
    )  # fmt: skip
    assert sent["ok"] and sent["output"] == {"delivered": True, "id": 7}, sent
    assert session.stdout is not None
    seen = json.loads(session.stdout.readline())
    assert seen == {"app": "aiosd", "summary": "Backup done", "body": "3 files", "urgency": 0}
    bobs = users("in2").call("tool.call", {"name": "notify.send", "arguments": {"summary": "x"}})
    bob_bus = f"/run/user/{unix_users['in2'].uid}/bus"
    assert bobs["output"] == {"delivered": False, "reason": f"no session: {bob_bus} does not exist"}

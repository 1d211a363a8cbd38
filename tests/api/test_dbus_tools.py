"""Confirmation requests on the bus (issue 11): to the asking user's connections only.

alice (``in``) asks over the socket for a destructive tool call; her desktop, a bus connection
of hers, is sent ``ConfirmationRequested`` with the tool and its whole arguments and answers
with ``Tool.Confirm``.  bob (``in2``) and root (an administrator) are sent nothing, and bob's
``Confirm`` of her request answers NotFound.  Every connection is made by a process of its
user (bench/peer.py), so the bus and the daemon know them from the kernel.
"""

from __future__ import annotations

import json
import secrets
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gi.repository import Gio, GLib

from aiosd.api.dbus import names
from aiosd.errors import AiosError, NotFound
from tests.conftest import UnixUser
from tests.support import (
    BusSession,
    Daemon,
    PrivateBus,
    UserClient,
    owned,
    user_home,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e

TOOL = names.FAMILY_INTERFACES["tool"]


class Setup:
    def __init__(self, bus: PrivateBus, daemon: Daemon) -> None:
        self.bus = bus
        self.daemon = daemon


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-dbus-tools-"))
    directory.chmod(0o755)
    bus = PrivateBus(directory / "bus")
    bus.start()
    config = write_config(
        directory, dbus_address=bus.address, extra="[tools]\nconfirm_timeout = 20.0\n"
    )
    d = Daemon(directory, config)
    try:
        d.wait_ready()
        yield Setup(bus, d)
    finally:
        code = d.stop()
        bus.stop()
        assert code == 0, d.log()


class Desktop:
    """A bus connection of one user that records the confirmation requests it is sent."""

    def __init__(self, bus: PrivateBus, user: UnixUser | None) -> None:
        self.session = BusSession(bus, user)
        self.seen: list[tuple[str, ...]] = []
        self.session.con.signal_subscribe(
            None, TOOL, "ConfirmationRequested", None, None, Gio.DBusSignalFlags.NONE, self._on
        )
        # The daemon sends a user's requests to the connections of theirs it has heard from.
        self.session.call(TOOL, "Pending")

    def _on(self, _con: Any, _sender: str, path: str, iface: str, member: str, args: Any) -> None:
        self.seen.append(args.unpack())

    def pump(self) -> list[tuple[str, ...]]:
        context = GLib.MainContext.default()
        while context.iteration(False):
            pass
        return self.seen


def test_the_request_goes_to_her_desktop_only(
    setup: Setup, unix_users: dict[str, UnixUser]
) -> None:
    alice_user = unix_users["in"]
    folder = owned(alice_user, user_home(alice_user) / f"bus-{secrets.token_hex(4)}", mode=0o700)
    target = folder / "from-the-desktop.txt"
    mine, bobs, roots = (Desktop(setup.bus, u) for u in (alice_user, unix_users["in2"], None))
    socket = UserClient(alice_user, setup.daemon.socket_path, 60)
    outcome: list[Any] = []

    def write() -> None:
        try:
            args = {"path": str(target), "content": "approved\n", "mode": "create"}
            outcome.append(socket.call("tool.call", {"name": "fs.write", "arguments": args}))
        except AiosError as exc:
            outcome.append(exc)

    t = threading.Thread(target=write)
    t.start()
    try:
        wait_until(lambda: mine.pump(), 20, "ConfirmationRequested on alice's connection")
        [(request, tool, arguments, annotations, aid, expires)] = mine.seen
        assert tool == "fs.write" and aid == ""
        assert json.loads(arguments) == {
            "path": str(target), "content": "approved\n", "mode": "create"}  # fmt: skip
        assert annotations["destructive"] is True and expires > 0
        assert not target.exists()

        # bob cannot answer it: it does not exist for him.
        with pytest.raises(NotFound):
            bobs.session.client().call(
                "tool.confirm", {"request": request, "allow": True, "remember": "once"}
            )
        answer = mine.session.client().call(
            "tool.confirm", {"request": request, "allow": True, "remember": "once"}
        )
        assert answer["allowed"] is True and answer["tool"] == "fs.write"
        t.join(20)
        assert not t.is_alive()
        [result] = outcome
        assert isinstance(result, dict) and result["ok"], result
        assert target.read_text() == "approved\n"
        # Neither bob nor an administrator was sent her request.
        assert bobs.pump() == [] and roots.pump() == []
    finally:
        t.join(25)
        socket.close()
        for d in (mine, bobs, roots):
            d.session.close()
        shutil.rmtree(folder, ignore_errors=True)

"""Agent objects on the bus (issue 10): seen and followed by their owner and administrators only.

Every connection of ``in`` (alice) and ``in2`` (bob), both members of ``aios``, is opened by a
process of theirs (bench/peer.py), so the bus and the daemon see their credentials from the
kernel; the test itself runs as root, an administrator.  The module has a bus and a daemon of
its own.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gi.repository import Gio, GLib

from aiosd.api.dbus import names
from aiosd.errors import NotFound
from tests.conftest import UnixUser
from tests.support import BusSession, Daemon, PrivateBus, wait_until, write_config

pytestmark = pytest.mark.e2e

AGENT = names.AGENT_INTERFACE


class Setup:
    def __init__(self, bus: PrivateBus, daemon: Daemon) -> None:
        self.bus = bus
        self.daemon = daemon


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-dbus-agents-"))
    directory.chmod(0o755)
    bus = PrivateBus(directory / "bus")
    bus.start()
    config = write_config(
        directory,
        dbus_address=bus.address,
        extra="[agents]\nstop_timeout = 2.0\nwatch_interval = 0.05\n",
    )
    d = Daemon(directory, config)
    try:
        d.wait_ready()
        yield Setup(bus, d)
    finally:
        code = d.stop()
        bus.stop()
        assert code == 0, d.log()


class Watcher:
    """A bus connection of one user that records every signal it is handed about agents."""

    def __init__(self, bus: PrivateBus, user: UnixUser | None) -> None:
        self.session = BusSession(bus, user)
        #: (object path, interface, member, arguments) of each signal, in arrival order.
        self.seen: list[tuple[str, str, str, Any]] = []
        self.session.con.signal_subscribe(
            None, None, None, None, None, Gio.DBusSignalFlags.NONE, self._on_signal
        )
        # The daemon sends an agent's signals to the connections it has heard from.
        self.session.call(names.OBJECT_MANAGER, "GetManagedObjects")

    def _on_signal(
        self, _con: Any, _sender: str, path: str, iface: str, member: str, args: Any
    ) -> None:
        if path.startswith(names.OBJECT_PATH):
            self.seen.append((path, iface, member, args.unpack()))

    def pump(self) -> list[tuple[str, str, str, Any]]:
        """Dispatch what has arrived; everything seen so far."""
        context = GLib.MainContext.default()
        while context.iteration(False):
            pass
        return self.seen

    def about(self, path: str) -> list[tuple[str, str, Any]]:
        """The signals seen about the agent object at ``path``: on it, or naming it."""
        out = []
        for p, iface, member, args in self.pump():
            if p == path or (member.startswith("Interfaces") and args[0] == path):
                out.append((iface, member, args if p == path else args[1]))
        return out

    def wait_for(self, path: str, member: str, timeout: float = 30) -> Any:
        """The arguments of the first ``member`` signal about ``path`` (waiting for it)."""

        def got() -> list[Any]:
            return [args for _, m, args in self.about(path) if m == member]

        wait_until(lambda: bool(got()), timeout, f"{member} about {path}", self.pump)
        return got()[0]

    def managed(self) -> dict[str, Any]:
        reply = self.session.call(names.OBJECT_MANAGER, "GetManagedObjects")
        objects: dict[str, Any] = reply.unpack()[0]
        return objects


@pytest.fixture
def watchers(setup: Setup) -> Iterator[Any]:
    opened: list[Watcher] = []

    def open_(user: UnixUser | None) -> Watcher:
        w = Watcher(setup.bus, user)
        opened.append(w)
        return w

    yield open_
    for w in opened:
        w.session.close()


def _probes(path: str) -> list[tuple[str, str, GLib.Variant | None]]:
    """Every kind of call one can make on an object path."""
    return [
        (names.DBUS_INTROSPECTABLE, "Introspect", None),
        (names.DBUS_PROPERTIES, "GetAll", GLib.Variant("(s)", (AGENT,))),
        (names.DBUS_PROPERTIES, "Get", GLib.Variant("(ss)", (AGENT, "State"))),
        (
            names.DBUS_PROPERTIES,
            "Set",
            GLib.Variant("(ssv)", (AGENT, "State", GLib.Variant("s", "x"))),
        ),
        (AGENT, "Stop", None),
        (names.DBUS_PEER, "Ping", None),
    ]


def _seen_at(session: BusSession, path: str) -> list[tuple[str, str]]:
    """What ``session`` gets from every probe of ``path``, the path itself blanked out."""
    return [
        (name, message.replace(path, "PATH"))
        for name, message in (session.answer(i, m, a, path) for i, m, a in _probes(path))
    ] + [
        session.answer(names.DBUS_INTROSPECTABLE, "Introspect", None, p)
        for p in (names.AGENT_PATH_PREFIX, names.OBJECT_PATH)
    ]


def test_an_agent_object_is_followed_by_its_owner_and_administrators_and_no_one_else(
    setup: Setup, watchers: Any, unix_users: dict[str, UnixUser]
) -> None:
    alice, bob, root = watchers(unix_users["in"]), watchers(unix_users["in2"]), watchers(None)
    nowhere = names.agent_path(secrets.token_hex(6))
    bob_before = _seen_at(bob.session, nowhere)

    spawned = alice.session.client().call(
        "agent.spawn", {"argv": ["/bin/sleep", "300"], "label": "on the bus"}
    )
    aid, pid = spawned["aid"], spawned["pid"]
    path = names.agent_path(aid)

    # Alice and the administrator see it appear, with its properties.
    for w in (alice, root):
        props = w.wait_for(path, "InterfacesAdded")[AGENT]
        assert props == {
            "Aid": aid,
            "State": "running",
            "Owner": unix_users["in"].name,
            "Uid": unix_users["in"].uid,
            "Pid": pid,
            "Label": "on the bus",
        }
        assert w.managed()[path][AGENT]["Owner"] == unix_users["in"].name
    state = alice.session.call(
        names.DBUS_PROPERTIES, "Get", GLib.Variant("(ss)", (AGENT, "State")), path
    )
    assert state.unpack() == ("running",)
    xml = alice.session.call(names.DBUS_INTROSPECTABLE, "Introspect", None, path).unpack()[0]
    assert f'interface name="{AGENT}"' in xml

    # Suspended and resumed by its owner: both follow each change.
    alice.session.client().call("agent.suspend", {"aid": aid})
    for w in (alice, root):
        assert w.wait_for(path, "StateChanged") == ("suspended", "")
    alice.session.client().call("agent.resume", {"aid": aid})
    for w in (alice, root):
        wait_until(
            lambda w=w: (
                [a for _, m, a in w.about(path) if m == "StateChanged"][-1:] == [("running", "")]
            ),
            30,
            "StateChanged to running",
            w.pump,
        )
        changes = [a for i, m, a in w.about(path) if m == "PropertiesChanged"]
        assert [c[1]["State"] for c in changes] == ["suspended", "running"]

    # Bob: the object is not there for him, in any way, not even as a child node.
    assert path not in bob.managed()
    assert _seen_at(bob.session, path) == _seen_at(bob.session, nowhere) == bob_before
    for method, extra in (("agent.info", {}), ("agent.stop", {}), ("agent.suspend", {})):
        with pytest.raises(NotFound) as theirs:
            bob.session.client().call(method, {"aid": aid, **extra})
        with pytest.raises(NotFound) as none:
            bob.session.client().call(method, {"aid": nowhere.rsplit("/", 1)[1], **extra})
        assert theirs.value.message == none.value.message.replace(nowhere.rsplit("/", 1)[1], aid)

    # The administrator stops it; its owner hears how it ended, then the object goes.
    stopped = root.session.client().call("agent.stop", {"aid": aid})
    assert stopped["state"] == "killed"
    for w in (alice, root):
        removed = w.wait_for(path, "InterfacesRemoved")
        assert removed == [AGENT]
        ends = [a for _, m, a in w.about(path) if m == "StateChanged"]
        assert ends[-1][0] == "killed" and ends[-1][1].startswith("stopped by an admin"), ends
        members = [m for _, m, _ in w.about(path)]
        assert members.index("InterfacesRemoved") == len(members) - 1, members
        assert path not in w.managed()

    # Everything alice was told had as long to reach bob, and one more round trip on his
    # connection, which the bus orders after them: he was told nothing.
    bob.session.call(names.DBUS_PEER, "Ping")
    assert bob.about(path) == []
    assert [s for s in bob.pump() if s[0].startswith(names.AGENT_PATH_PREFIX)] == []

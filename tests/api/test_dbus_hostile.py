"""The D-Bus front-end under hostile local users (issue 9).

Every call here is made on a bus connection that a real Unix user's own process opened
(bench/peer.py), so the daemon sees that user's credentials: ``in`` and ``in2`` are members of
``aios`` (role user), ``out`` has no role, the test itself runs as root (an administrator).
The daemon runs on a bus of this module's own, so a failure that cuts the daemon off the bus
cannot spill into other modules.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gi.repository import Gio, GLib

from aiosd.api.dbus import names
from aiosd.errors import ContextTooLong, NotSupported
from aiosd.kernel.syscall_base import MAX_NESTING
from aiosd.sdk import Client
from bench.peer import rss
from tests.conftest import UnixUser
from tests.support import (
    BusSession,
    Daemon,
    PrivateBus,
    RawClient,
    queue_of,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e

SYSTEM = names.PROPERTIES_INTERFACE
PERMISSION_DENIED = "org.aiosd.Daemon1.Error.PermissionDenied"
TOO_MANY = "org.aiosd.Daemon1.Error.TooManyRequests"
#: Bounds of the module's daemon ([dbus] in a drop-in): 3 calls per user, 6 in all, of which
#: the last 2 only for administrators.
PER_USER, TOTAL, RESERVED = 3, 6, 2
LONG = {"messages": [{"role": "user", "content": "Write a very long story"}], "max_tokens": 256}


class Setup:
    """The module's bus and daemon."""

    def __init__(self, bus: PrivateBus, daemon: Daemon) -> None:
        self.bus = bus
        self.daemon = daemon


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-hostile-"))
    directory.chmod(0o755)
    bus = PrivateBus(directory / "bus")
    bus.start()
    config = write_config(directory, dbus_address=bus.address)
    dropin = Path(str(config) + ".d")
    dropin.mkdir()
    (dropin / "limits.toml").write_text(
        f"[dbus]\nmax_calls_per_user = {PER_USER}\nmax_calls = {TOTAL}\n"
        f"admin_reserved_calls = {RESERVED}\n"
    )
    d = Daemon(directory, config)
    try:
        d.wait_ready()
        yield Setup(bus, d)
    finally:
        code = d.stop()
        bus.stop()
        assert code == 0, d.log()


@pytest.fixture
def sessions(setup: Setup) -> Iterator[Any]:
    """``open(user)``: a new BusSession, closed at the end of the test."""
    opened: list[BusSession] = []

    def open_(user: UnixUser | None) -> BusSession:
        s = BusSession(setup.bus, user)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


def _name_owned(bus: PrivateBus) -> bool:
    s = BusSession(bus, None)
    try:
        reply = s.con.call_sync(
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameHasOwner",
            GLib.Variant("(s)", (names.BUS_NAME,)),
            None,
            0,
            -1,
            None,
        )
        return bool(reply.unpack()[0])
    finally:
        s.close()


def _start(s: BusSession, params: dict[str, Any] = LONG) -> str:
    """StartChat; the request object's path."""
    messages = [{k: GLib.Variant("s", v) for k, v in m.items()} for m in params["messages"]]
    options = {"max_tokens": GLib.Variant("x", params["max_tokens"])}
    reply = s.call(
        "org.aiosd.Daemon1.LLM", "StartChat", GLib.Variant("(aa{sv}a{sv})", (messages, options))
    )
    return str(reply.unpack()[0])


def _growth(pid: int, calls: Any, warm: int, measured: int) -> int:
    """RSS growth (bytes) over ``measured`` runs of ``calls()``, after ``warm`` runs."""
    for _ in range(warm):
        calls()
    before = rss(pid)["VmRSS"]
    for _ in range(measured):
        calls()
    return rss(pid)["VmRSS"] - before


# --- 1. memory: what a call takes, it gives back ------------------------------------------------


def test_calls_from_a_user_with_no_role_leave_no_memory_behind(
    setup: Setup, sessions: Any, unix_users: dict[str, UnixUser]
) -> None:
    out = sessions(unix_users["out"])
    get_all = GLib.Variant("(s)", (SYSTEM,))

    def refused() -> None:
        out.answer(names.DBUS_PROPERTIES, "GetAll", get_all)  # refused or not: see below
        assert out.answer(SYSTEM, "Status")[0] == PERMISSION_DENIED

    # 2 KB per call used to stay behind: 10,000 pairs of calls grew the daemon by ~35 MiB.
    grown = _growth(setup.daemon.proc.pid, refused, 1000, 10_000)
    assert grown < 4 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB over 20,000 calls"


def test_request_objects_leave_no_memory_behind(
    setup: Setup, sessions: Any, unix_users: dict[str, UnixUser]
) -> None:
    client = sessions(unix_users["in"]).client()
    # A prompt the model cannot take: each request object is made, fails and goes, with
    # little of the kernel's own memory (its first generations warm caches up) in the way.
    too_long = {"messages": [{"role": "user", "content": "word " * 6000}], "max_tokens": 1}

    def chat() -> None:
        with pytest.raises(ContextTooLong):
            list(client.stream("llm.chat", too_long))

    # Each used to keep its StartChat call, message and all: ~32 KiB, 9.5 MiB per 300.
    grown = _growth(setup.daemon.proc.pid, chat, 300, 300)
    assert grown < 4 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB over 300 StartChat"


# --- 2. one caller's reply the bus would refuse cuts nobody off ---------------------------------


def _store_metadata(setup: Setup, collection: str, key: str, metadata: dict[str, Any]) -> None:
    """Put an entry as root over the socket, then give it ``metadata`` straight in SQLite
    (past the door that refuses such metadata in params)."""
    with Client(setup.daemon.socket_path) as c:
        c.call("storage.put", {"collection": collection, "key": key, "value": "v"})
    db = sqlite3.connect(setup.daemon.directory / "state" / "storage" / "0.sqlite", timeout=30)
    try:
        with db:
            changed = db.execute(
                "UPDATE versions SET metadata = ? WHERE collection = ? AND key = ?",
                (json.dumps(metadata), collection, key),
            ).rowcount
    finally:
        db.close()
    assert changed == 1


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_a_reply_the_bus_would_refuse_is_an_error_for_its_caller_only(
    setup: Setup, sessions: Any, unix_users: dict[str, UnixUser]
) -> None:
    _store_metadata(setup, "hostile", "deep", _nested(40))
    _store_metadata(setup, "hostile", "huge", {"n": 2**64})
    other = sessions(unix_users["in"]).client()
    stream = other.stream("llm.chat", {**LONG, "max_tokens": 64})
    next(stream)  # another user's generation is under way
    root = sessions(None)
    get = "org.aiosd.Daemon1.Storage", "Get"
    deep = root.answer(*get, GLib.Variant("(ssa{sv})", ("hostile", "deep", {})))
    huge = root.answer(*get, GLib.Variant("(ssa{sv})", ("hostile", "huge", {})))
    assert deep[0] == huge[0] == "org.aiosd.Daemon1.Error.NotSupported", (deep, huge)
    assert "metadata.a.a" in deep[1] and "nested" in deep[1]
    assert "metadata.n" in huge[1] and "64" in huge[1]
    # The daemon is still on the bus, and the other user's stream ends as it should.
    rest = list(stream)
    assert other.last_result["usage"]["completion_tokens"] == len(rest) + 1
    assert _name_owned(setup.bus)
    assert "lost the connection" not in setup.daemon.log()
    assert "Traceback" not in setup.daemon.log()
    # The same entries are readable over the socket, as the error says.
    with Client(setup.daemon.socket_path) as c:
        got = c.call("storage.get", {"collection": "hostile", "key": "huge"})
    assert got["metadata"] == {"n": 2**64}


def test_the_deepest_metadata_the_door_admits_still_travels(setup: Setup, sessions: Any) -> None:
    deepest = _nested(MAX_NESTING - 1)
    with Client(setup.daemon.socket_path) as c:
        entry = {"collection": "hostile", "key": "door", "value": "v", "metadata": deepest}
        c.call("storage.put", entry)
    got = sessions(None).client().call("storage.get", {"collection": "hostile", "key": "door"})
    assert got["metadata"] == deepest


def test_the_codecs_depth_limit_is_the_bus_own(setup: Setup) -> None:
    """The deepest result the codec sends, the bus takes; one level more, the bus would
    drop the sender's connection for (shown on a connection of the test's own)."""
    deepest = next(n for n in range(40, 0, -1) if _encodes(n))
    assert deepest == 20  # each level of an object is three on the bus: 3 * 21 + 1 > 64
    fits = _send(setup.bus, GLib.Variant("(a{sv})", (_raw_metadata(deepest),)))
    deeper = _send(setup.bus, GLib.Variant("(a{sv})", (_raw_metadata(deepest + 1),)))
    assert fits and not deeper


def _encodes(levels: int) -> bool:
    from aiosd.api.dbus.codec import result_body
    from aiosd.kernel.families.storage import GetResult

    result = {
        "collection": "c",
        "key": "k",
        "version": 1,
        "value": "v",
        "encoding": "text",
        "metadata": _nested(levels),
        "size": 1,
        "created": 0.0,
    }
    try:
        result_body(GetResult, result)
    except NotSupported:
        return False
    return True


def _raw_metadata(levels: int) -> dict[str, GLib.Variant]:
    """``{"metadata": _nested(levels)}`` built with GLib alone (no depth check)."""
    value = GLib.Variant("a{sv}", {"leaf": GLib.Variant("x", 1)})
    for _ in range(levels - 1):
        value = GLib.Variant("a{sv}", {"a": value})
    return {"metadata": value}


def _send(bus: PrivateBus, body: GLib.Variant) -> bool:
    """Broadcast a signal with ``body`` from a new connection; whether the bus kept it."""
    s = BusSession(bus, None)
    try:
        s.con.emit_signal(None, "/org/aiosd/Test", "org.aiosd.Test", "Deep", body)
        s.con.call_sync(
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetId",
            None,
            None,
            0,
            30_000,
            None,
        )
    except GLib.Error:
        return False
    finally:
        if not s.con.is_closed():
            s.close()
    return True


# --- 3. what callers without a role, and other users, can learn ---------------------------------


def test_a_caller_with_no_role_gets_the_introspection_and_nothing_else(
    setup: Setup, sessions: Any, unix_users: dict[str, UnixUser]
) -> None:
    out = sessions(unix_users["out"])
    props = names.DBUS_PROPERTIES
    for method, args in (
        ("GetAll", GLib.Variant("(s)", (SYSTEM,))),
        ("GetAll", GLib.Variant("(s)", ("",))),
        ("Get", GLib.Variant("(ss)", (SYSTEM, "State"))),
        ("Get", GLib.Variant("(ss)", (SYSTEM, "Colour"))),
        ("Set", GLib.Variant("(ssv)", (SYSTEM, "State", GLib.Variant("s", "x")))),
    ):
        name, message = out.answer(props, method, args)
        assert name == PERMISSION_DENIED, (method, name, message)
        assert f"uid {unix_users['out'].uid}" in message
    name, _ = out.answer(names.OBJECT_MANAGER, "GetManagedObjects")
    assert name == PERMISSION_DENIED
    # Not even what is wrong with its arguments: they are not looked at.
    hi = [{"role": GLib.Variant("s", "user"), "content": GLib.Variant("s", "hi")}]
    for method in ("Chat", "StartChat"):
        for options in ({"colour": GLib.Variant("s", "red")}, {"stream": GLib.Variant("b", True)}):
            args = GLib.Variant("(aa{sv}a{sv})", (hi, options))
            assert out.answer("org.aiosd.Daemon1.LLM", method, args)[0] == PERMISSION_DENIED
    xml = out.call(names.DBUS_INTROSPECTABLE, "Introspect").unpack()[0]
    assert f'interface name="{SYSTEM}"' in xml
    # A user with a role reads them as before.
    user = sessions(unix_users["in"])
    state = user.call(props, "Get", GLib.Variant("(ss)", (SYSTEM, "State")))
    assert state.unpack() == ("running",)
    assert user.call(names.OBJECT_MANAGER, "GetManagedObjects").unpack() == ({},)


def test_the_daemons_signals_reach_only_callers_with_a_role(
    setup: Setup, sessions: Any, unix_users: dict[str, UnixUser]
) -> None:
    # The manager's PropertiesChanged is a broadcast: how busy the daemon is, whenever it
    # changes.  The bus policy hands aiosd's signals only to the members of its groups.
    got: dict[str, list[Any]] = {"in": [], "out": []}
    opened = {}
    for who in got:
        s = opened[who] = sessions(unix_users[who])
        s.con.signal_subscribe(
            None,  # every sender: GDBus would not resolve the well-known name for us
            names.DBUS_PROPERTIES,
            "PropertiesChanged",
            names.OBJECT_PATH,
            None,
            Gio.DBusSignalFlags.NONE,
            lambda *args, who=who: got[who].append(args[5].unpack()),
        )
        s.call(names.DBUS_PEER, "Ping")  # the match rule is in place once this returns
    root = sessions(None)
    path = _start(root, {**LONG, "max_tokens": 4})
    context = GLib.MainContext.default()

    def seen_running_and_idle() -> bool:
        while context.iteration(False):
            pass
        running = [changed["Running"] for _, changed, _ in got["in"] if "Running" in changed]
        return 1 in running and running[-1] == 0

    wait_until(seen_running_and_idle, 60, "the member to see the chat run and end", got.copy)
    # The same broadcasts had as long to reach the user with no role, and one more round trip
    # on its connection, which the bus orders after them.
    opened["out"].call(names.DBUS_PEER, "Ping")
    while context.iteration(False):
        pass
    assert got["out"] == []
    assert path.startswith(names.REQUEST_PATH_PREFIX)


def _probes(path: str) -> list[tuple[str, str, GLib.Variant | None]]:
    request = names.REQUEST_INTERFACE
    return [
        (names.DBUS_INTROSPECTABLE, "Introspect", None),
        (names.DBUS_PROPERTIES, "GetAll", GLib.Variant("(s)", (request,))),
        (names.DBUS_PROPERTIES, "Get", GLib.Variant("(ss)", (request, "State"))),
        (
            names.DBUS_PROPERTIES,
            "Set",
            GLib.Variant("(ssv)", (request, "State", GLib.Variant("s", "x"))),
        ),
        (request, "Cancel", None),
        (request, "Colour", None),
        (names.DBUS_PEER, "Ping", None),
    ]


def test_another_users_request_object_is_indistinguishable_from_none(
    setup: Setup, sessions: Any, unix_users: dict[str, UnixUser]
) -> None:
    owner, other = sessions(unix_users["in"]), sessions(unix_users["in2"])
    nowhere = f"{names.REQUEST_PATH_PREFIX}/999999"

    def seen_by_other(path: str) -> list[tuple[str, str]]:
        return [
            (name, message.replace(path, "PATH"))
            for name, message in (other.answer(i, m, a, path) for i, m, a in _probes(path))
        ] + [
            other.answer(names.DBUS_INTROSPECTABLE, "Introspect", None, p)
            for p in (names.REQUEST_PATH_PREFIX, names.OBJECT_PATH, "/")
        ]

    before = seen_by_other(nowhere)
    path = _start(owner)
    during, during_nowhere = seen_by_other(path), seen_by_other(nowhere)
    # The owner sees its request; the other user sees exactly what a path with nothing gives.
    xml = owner.call(names.DBUS_INTROSPECTABLE, "Introspect", None, path).unpack()[0]
    assert f'interface name="{names.REQUEST_INTERFACE}"' in xml
    state = owner.call(
        names.DBUS_PROPERTIES, "Get", GLib.Variant("(ss)", (names.REQUEST_INTERFACE, "State")), path
    )
    assert state.unpack()[0] in ("pending", "streaming")
    assert during == during_nowhere == before
    assert owner.call(names.REQUEST_INTERFACE, "Cancel", None, path).unpack() == ()


# --- 4. bounds per user, a reserve for administrators -------------------------------------------


def test_calls_in_flight_are_bounded_per_user_with_a_reserve_for_administrators(
    setup: Setup, sessions: Any, unix_users: dict[str, UnixUser]
) -> None:
    first, second, root = sessions(unix_users["in"]), sessions(unix_users["in2"]), sessions(None)
    held = [_start(first) for _ in range(PER_USER)]
    with pytest.raises(GLib.Error) as over:
        _start(first)
    assert Gio.DBusError.get_remote_error(over.value) == TOO_MANY
    assert "dbus.max_calls_per_user" in over.value.message
    # Another connection of the same user counts for the same user.
    with pytest.raises(GLib.Error):
        _start(sessions(unix_users["in"]))
    held += [_start(second) for _ in range(TOTAL - RESERVED - PER_USER)]
    with pytest.raises(GLib.Error) as shared:
        _start(second)
    assert Gio.DBusError.get_remote_error(shared.value) == TOO_MANY
    assert "administrators" in shared.value.message
    held += [_start(root) for _ in range(RESERVED)]
    with pytest.raises(GLib.Error) as full:
        _start(root)
    assert "dbus.max_calls" in full.value.message
    assert len(set(held)) == TOTAL
    # Ending a request gives its place back.
    first.call(names.REQUEST_INTERFACE, "Cancel", None, held[0])
    wait_until(lambda: _can_start(first), 60, "the cancelled request's place given back")


def _can_start(s: BusSession) -> bool:
    try:
        path = _start(s, {**LONG, "max_tokens": 1})
    except GLib.Error:
        return False
    try:
        s.call(names.REQUEST_INTERFACE, "Cancel", None, path)
    except GLib.Error:
        pass  # it may have ended already
    return True


def test_a_client_that_leaves_releases_its_requests_and_their_generations(
    setup: Setup, sessions: Any, unix_users: dict[str, UnixUser]
) -> None:
    raw = RawClient(setup.daemon.socket_path)
    try:
        wait_until(
            lambda: not (q := queue_of(raw))["running"] and not q["waiting"],
            120,
            "an idle model",
        )
        leaving = BusSession(setup.bus, unix_users["in"])
        for _ in range(PER_USER):
            _start(leaving)
        wait_until(lambda: len(queue_of(raw)["running"]) == 2, 60, "the generations running")
        leaving.close()
        wait_until(
            lambda: not (q := queue_of(raw))["running"] and not q["waiting"],
            60,
            "the generations of the client that left cancelled",
        )
        # Its places are free again: the same user starts as many requests anew.
        again = sessions(unix_users["in"])
        paths = [_start(again) for _ in range(PER_USER)]
        assert len(set(paths)) == PER_USER
        for p in paths:
            again.call(names.REQUEST_INTERFACE, "Cancel", None, p)
    finally:
        raw.close()


# --- 5. a reply larger than the bus takes --------------------------------------------------------


def test_a_reply_larger_than_a_bus_message_is_an_error_for_its_caller_only(
    setup: Setup, sessions: Any, unix_users: dict[str, UnixUser]
) -> None:
    with Client(setup.daemon.socket_path) as c:
        c.call("storage.put", {"collection": "hostile", "key": "big", "value": "v"})
    db = sqlite3.connect(setup.daemon.directory / "state" / "storage" / "0.sqlite", timeout=30)
    try:
        with db:  # bytes beyond the stock bus's 32 MiB a message, past every door
            db.execute(
                "UPDATE versions SET value = zeroblob(?), is_text = 0 "
                "WHERE collection = 'hostile' AND key = 'big'",
                (33 * 1024 * 1024,),
            )
    finally:
        db.close()
    other = sessions(unix_users["in"]).client()
    stream = other.stream("llm.chat", {**LONG, "max_tokens": 32})
    next(stream)
    name, message = sessions(None).answer(
        "org.aiosd.Daemon1.Storage", "Get", GLib.Variant("(ssa{sv})", ("hostile", "big", {}))
    )
    assert name == "org.aiosd.Daemon1.Error.NotSupported", (name, message)
    assert "dbus.max_message_bytes" in message
    list(stream)
    assert other.last_result["usage"]["completion_tokens"] > 0
    assert _name_owned(setup.bus)
    assert "lost the connection" not in setup.daemon.log()

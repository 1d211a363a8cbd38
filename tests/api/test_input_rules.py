"""Input a transport cannot carry back is refused at the door, the same on the socket and on
D-Bus: a real daemon on a real dbus-daemon, called over both.

Each case once gave an internal error with a traceback, stored a value that every later read
failed on, came back changed, or made the bus drop the daemon's connection for everyone.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiosd.kernel.syscall_base import INT64_MAX, MAX_NESTING
from aiosd.sdk.dbus import BusClient
from tests.support import Daemon, PrivateBus, RawClient, write_config

pytestmark = pytest.mark.e2e

DEST = ("org.aiosd.Daemon1", "/org/aiosd/Daemon1")
STORAGE = "org.aiosd.Daemon1.Storage"
INVALID_ARGS = "org.aiosd.Daemon1.Error.InvalidArgs"
INVALID, NOT_FOUND = -32602, -32012


@pytest.fixture(scope="module")
def wire_daemon(private_bus: PrivateBus) -> Iterator[Daemon]:
    """A daemon serving its socket and the private bus."""
    directory = Path(tempfile.mkdtemp(prefix="aiosd-wire-"))
    directory.chmod(0o755)
    d = Daemon(directory, write_config(directory, dbus_address=private_bus.address, slots=1))
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0, d.log()


@pytest.fixture
def sock(wire_daemon: Daemon) -> Iterator[RawClient]:
    client = RawClient(wire_daemon.socket_path)
    yield client
    client.close()


def raw_call(client: RawClient, method: str, params_json: str) -> dict[str, Any]:
    """A request whose params are JSON text as written (NaN, "\\ud800" escapes and all)."""
    frame = f'{{"jsonrpc":"2.0","id":1,"method":"{method}","params":{params_json}}}\n'
    client.send_raw(frame.encode())
    return client.recv()


def refused(reply: dict[str, Any], field: str) -> str:
    """The message of an InvalidParams reply whose first error names ``field``."""
    assert "error" in reply, reply
    error = reply["error"]
    assert error["code"] == INVALID, reply
    assert error["data"]["errors"][0]["field"] == field, error
    message: str = error["message"]
    return message


def bus(address: str, method: str, signature: str, args: tuple[Any, ...]) -> Any:
    """One call to the daemon on a fresh connection: the reply, or the GLib.Error raised."""
    from gi.repository import Gio, GLib

    con = Gio.DBusConnection.new_for_address_sync(
        address,
        Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
        None,
        None,
    )
    iface, _, name = method.rpartition(".")
    try:
        return con.call_sync(
            DEST[0], DEST[1], iface, name, GLib.Variant(signature, args), None, 0, 60000, None
        )
    except GLib.Error as exc:
        return exc
    finally:
        if not con.is_closed():
            con.close_sync(None)


def bus_refused(reply: Any, field: str) -> str:
    """The message of an InvalidArgs error naming ``field``."""
    from gi.repository import Gio, GLib

    assert isinstance(reply, GLib.Error), reply
    assert Gio.DBusError.get_remote_error(reply) == INVALID_ARGS, reply.message
    message: str = reply.message
    assert f"invalid params: {field}: " in message, message
    return message


def usage(client: RawClient) -> dict[str, Any]:
    reply = client.call("storage.usage", {})
    assert "result" in reply, reply
    result: dict[str, Any] = reply["result"]
    return result


@pytest.fixture(autouse=True)
def no_internal_errors(wire_daemon: Daemon) -> Iterator[None]:
    """Every test here also fails if the daemon logged an internal error while it ran."""
    start = len(wire_daemon.log())
    yield
    log = wire_daemon.log()[start:]
    assert "failed unexpectedly" not in log and "Traceback" not in log, log[-4000:]


def nested(levels: int, leaf: Any, kind: str = "object") -> Any:
    """``levels`` objects (or arrays) one inside the other, the outermost counted."""
    value = leaf
    for _ in range(levels):
        value = {"a": value} if kind == "object" else [value]
    return value


# --- (10) internal errors from names, text and numbers ------------------------------------------

NAMED = [
    ("storage.get", {"collection": "c", "key": "k", "owner": "X"}, "owner"),
    ("storage.list", {"collection": "c", "owner": "X"}, "owner"),
    ("storage.history", {"collection": "c", "key": "k", "owner": "X"}, "owner"),
    ("storage.search", {"query": "q", "collection": "c", "owner": "X"}, "owner"),
    ("storage.share", {"collection": "c", "group": "X"}, "group"),
    ("storage.unshare", {"collection": "c", "group": "X"}, "group"),
    ("storage.set_quota", {"user": "X", "quota_entries": 5}, "user"),
]


@pytest.mark.parametrize(("method", "params", "field"), NAMED)
def test_user_and_group_names_that_nss_cannot_take_are_invalid_params(
    wire_daemon: Daemon, sock: RawClient, method: str, params: dict[str, Any], field: str
) -> None:
    # Root asks (set_quota needs an administrator); JSON escapes as a client writes them.
    for bad in (r"a\u0000b", r"a\udc80b"):
        text = json.dumps(params).replace('"X"', f'"{bad}"')
        message = refused(raw_call(sock, method, text), field)
        assert "NUL" in message or "lone surrogate" in message


def test_lone_surrogates_in_metadata_and_search_filters_are_refused_and_nothing_is_written(
    wire_daemon: Daemon, sock: RawClient
) -> None:
    before = usage(sock)
    put = '{"collection":"sur","key":"k","value":"v","metadata":%s}'
    refused(raw_call(sock, "storage.put", put % r'{"k":"\ud800"}'), "metadata.k")
    refused(raw_call(sock, "storage.put", put % r'{"\ud800":1}'), r"metadata.\ud800")
    refused(raw_call(sock, "storage.put", put % r'{"a":{"b":["x\udfffy"]}}'), "metadata.a.b.0")
    search = r'{"query":"v","metadata":{"k":"\udc00"}}'
    refused(raw_call(sock, "storage.search", search), "metadata.k")
    assert usage(sock) == before
    got = sock.call("storage.get", {"collection": "sur", "key": "k"})
    assert got["error"]["code"] == NOT_FOUND, got


def test_versions_beyond_64_bits_never_reach_sqlite(
    private_bus: PrivateBus, wire_daemon: Daemon, sock: RawClient
) -> None:
    from gi.repository import GLib

    entry = {"collection": "ver", "key": "k"}
    assert "result" in sock.call("storage.put", {**entry, "value": "one"})
    for version in ("9223372036854775808", '"9223372036854775808"', '"1' + "0" * 30 + '"'):
        for method in ("storage.get", "storage.rollback"):
            params = '{"collection":"ver","key":"k","version":' + version + "}"
            assert "64-bit" in refused(raw_call(sock, method, params), "version")
    # Over D-Bus: an unsigned 64-bit integer, or the number as text.
    for held in (GLib.Variant("t", 2**63), GLib.Variant("s", "9223372036854775808")):
        for method in (f"{STORAGE}.Get", f"{STORAGE}.Rollback"):
            reply = bus(private_bus.address, method, "(ssa{sv})", ("ver", "k", {"version": held}))
            assert "64-bit" in bus_refused(reply, "version")
    assert sock.call("storage.get", entry)["result"]["version"] == 1


# --- (11) values that would change on the way --------------------------------------------------


def test_text_holding_nul_is_refused_not_cut(wire_daemon: Daemon, sock: RawClient) -> None:
    before = usage(sock)
    refused(sock.call("storage.put", {"collection": "nul", "key": "k", "value": "a\x00b"}), "value")
    refused(sock.call("memory.add", {"content": "a\x00b", "space": "nul"}), "content")
    chat = {"messages": [{"role": "user", "content": "hi\x00there"}], "max_tokens": 1}
    refused(sock.call("llm.chat", chat), "messages.0.content")
    assert usage(sock) == before


def test_nan_infinity_and_big_integers_are_refused_on_both_transports(
    private_bus: PrivateBus, wire_daemon: Daemon, sock: RawClient
) -> None:
    from gi.repository import GLib

    before = usage(sock)
    put = '{"collection":"num","key":"k","value":"v","metadata":%s}'
    for meta, field in (
        ('{"n":NaN}', "metadata.n"),
        ('{"n":Infinity}', "metadata.n"),
        ('{"n":-Infinity}', "metadata.n"),
        ('{"n":1e999}', "metadata.n"),  # read as infinity
        ('{"n":9223372036854775808}', "metadata.n"),
        ('{"n":[1,-9223372036854775809]}', "metadata.n.1"),
    ):
        refused(raw_call(sock, "storage.put", put % meta), field)
    for at in ("Infinity", '"Infinity"', '"nan"'):
        params = '{"collection":"num","key":"k","at":' + at + "}"
        refused(raw_call(sock, "storage.rollback", params), "at")
    for held in (GLib.Variant("d", float("nan")), GLib.Variant("t", 2**64 - 1)):
        options = {"metadata": GLib.Variant("a{sv}", {"n": held})}
        reply = bus(
            private_bus.address,
            f"{STORAGE}.Put",
            "(ssva{sv})",
            ("num", "k", GLib.Variant("s", "v"), options),
        )
        bus_refused(reply, "metadata.n")
    reply = bus(
        private_bus.address,
        f"{STORAGE}.Rollback",
        "(ssa{sv})",
        ("num", "k", {"at": GLib.Variant("d", float("inf"))}),
    )
    bus_refused(reply, "at")
    assert usage(sock) == before


def test_dbus_dictionaries_keyed_by_integers_are_refused_not_renamed(
    private_bus: PrivateBus, wire_daemon: Daemon, sock: RawClient
) -> None:
    from gi.repository import GLib

    keyed = GLib.Variant("a{xv}", {1: GLib.Variant("s", "x")})
    options = {"metadata": GLib.Variant("a{sv}", {"m": keyed})}
    reply = bus(
        private_bus.address,
        f"{STORAGE}.Put",
        "(ssva{sv})",
        ("keys", "k", GLib.Variant("s", "v"), options),
    )
    assert "not text" in bus_refused(reply, "metadata.m.1")
    got = sock.call("storage.get", {"collection": "keys", "key": "k"})
    assert got["error"]["code"] == NOT_FOUND, got  # not stored as {"m": {"1": "x"}}


# --- (3) nesting: the deepest metadata let in still travels back over D-Bus ----------------------


def test_the_deepest_metadata_let_in_travels_back_over_dbus_and_one_more_level_cannot(
    private_bus: PrivateBus, wire_daemon: Daemon, sock: RawClient
) -> None:
    from gi.repository import Gio, GLib

    from aiosd.api.dbus.variants import free_vardict

    # Metadata is a member of params, so it has one level less than the bound: 20 levels of
    # objects, the most a reply can carry (each costs three of D-Bus's 64 containers).
    levels = MAX_NESTING - 1
    deepest = nested(levels, INT64_MAX)
    entry = {"collection": "deep", "key": "k"}
    assert "result" in sock.call("storage.put", {**entry, "value": "v", "metadata": deepest})
    # The costliest innermost level: a null in an array travels as an empty byte array.
    with_null = nested(levels - 1, [None, "x"])
    other = {"collection": "deep", "key": "null"}
    assert "result" in sock.call("storage.put", {**other, "value": "v", "metadata": with_null})
    # Read back over D-Bus (the SDK, and a raw call), unchanged; the bus kept the daemon.
    with BusClient(private_bus.address) as client:
        assert client.call("storage.get", entry)["metadata"] == deepest
        assert client.call("storage.get", other)["metadata"] == with_null
        assert client.call("system.status")["state"] == "running"
    reply = bus(private_bus.address, f"{STORAGE}.Get", "(ssa{sv})", ("deep", "k", {}))
    assert not isinstance(reply, GLib.Error), reply

    # One level more is refused on the socket, by name ...
    message = refused(
        sock.call("storage.put", {**entry, "value": "v", "metadata": {"b": deepest}}),
        ".".join(["metadata", "b", *["a"] * (levels - 1)]),
    )
    assert f"nested deeper than {MAX_NESTING} levels" in message
    # ... and on D-Bus, where it fits only as arrays (two containers a level, not three).
    arrays = {"x": nested(levels, 1, "array")}
    as_arrays = {"metadata": GLib.Variant("a{sv}", free_vardict(arrays))}
    reply = bus(
        private_bus.address,
        f"{STORAGE}.Put",
        "(ssva{sv})",
        ("deep", "k", GLib.Variant("s", "v"), as_arrays),
    )
    assert "nested deeper" in bus_refused(reply, ".".join(["metadata", "x", *["0"] * (levels - 1)]))
    # The bound is the most D-Bus carries: 21 levels of objects cannot travel at all (the
    # bus drops the connection that sends them, here a throwaway one of this test's).
    too_deep = {"metadata": GLib.Variant("a{sv}", free_vardict(nested(levels + 1, 1)))}
    reply = bus(
        private_bus.address,
        f"{STORAGE}.Put",
        "(ssva{sv})",
        ("deep", "k", GLib.Variant("s", "v"), too_deep),
    )
    assert isinstance(reply, GLib.Error), reply
    assert reply.matches(Gio.io_error_quark(), Gio.IOErrorEnum.CLOSED), reply.message
    assert sock.call("storage.get", entry)["result"]["version"] == 1
    with BusClient(private_bus.address) as client:
        assert client.call("storage.get", entry)["metadata"] == deepest

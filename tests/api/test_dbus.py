"""The D-Bus front-end against a real dbus-daemon, with independent clients (busctl, gdbus)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiosd.api.dbus import names
from aiosd.api.dbus.service import DBusFrontend
from aiosd.config import Config, DBusConfig
from aiosd.kernel.kernel import Kernel
from aiosd.kernel.syscall_base import Params, Result, Syscall
from aiosd.kernel.syscalls import SYSCALLS
from aiosd.managers.access import Caller, Permission
from aiosd.sdk import Client
from aiosd.sdk.dbus import BusClient
from tests.conftest import UnixUser
from tests.support import REPO, Daemon, PrivateBus, call_every_syscall, write_config

pytestmark = pytest.mark.e2e

DEST = ["org.aiosd.Daemon1", "/org/aiosd/Daemon1"]


@pytest.fixture(scope="module")
def bus_daemon(private_bus: PrivateBus) -> Iterator[Daemon]:
    """A daemon on the private bus (2 slots), its socket reachable by the test users."""
    directory = Path(tempfile.mkdtemp(prefix="aiosd-dbus-"))
    directory.chmod(0o755)
    d = Daemon(directory, write_config(directory, dbus_address=private_bus.address))
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0, d.log()


def busctl(bus: PrivateBus, *args: str, user: UnixUser | None = None) -> Any:
    """Run busctl on the private bus; return its JSON output."""
    cmd = ["busctl", f"--address={bus.address}", *args, "--json=short"]
    if user is not None:
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=120,
            user=user.uid,
            group=user.gid,
            extra_groups=user.groups,
            cwd="/",
        )
    else:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def plain(value: Any) -> Any:
    """busctl's typed JSON ({"type", "data"}) to plain values."""
    if isinstance(value, dict) and set(value) == {"type", "data"}:
        return plain(value["data"])
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def gdbus(
    bus: PrivateBus, *args: str, user: UnixUser | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a gdbus command on the private bus (as ``user`` if given)."""
    cmd = ["gdbus", args[0], "--address", bus.address, *args[1:]]
    kw: dict[str, Any] = {}
    if user is not None:
        kw = {"user": user.uid, "group": user.gid, "extra_groups": user.groups, "cwd": "/"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# --- 1. introspection -------------------------------------------------------------------------


def _interfaces(xml: str) -> dict[str, Any]:
    """Interfaces of an introspection document, normalized for comparison."""
    out: dict[str, Any] = {}
    for iface in ET.fromstring(xml).findall("interface"):
        name = iface.get("name", "")
        if name.startswith("org.freedesktop.DBus.") and name != names.OBJECT_MANAGER:
            continue  # Introspectable, Peer, Properties: GDBus's own
        members = set()
        for kind in ("method", "signal", "property"):
            for m in iface.findall(kind):
                args = tuple(
                    (
                        a.get("name"),
                        a.get("type"),
                        a.get("direction", "in" if kind == "method" else None),
                    )
                    for a in m.findall("arg")
                )
                members.add((kind, m.get("name"), args, m.get("type"), m.get("access")))
        out[name] = members
    return out


def _doc_xml_blocks() -> list[str]:
    text = (REPO / "docs" / "dbus.md").read_text()
    return re.findall(r"```xml\n(.*?)```", text, re.S)


def test_live_introspection_equals_the_documented_xml(
    private_bus: PrivateBus, bus_daemon: Daemon
) -> None:
    manager_doc, request_doc = _doc_xml_blocks()
    live = gdbus(private_bus, "introspect", "--dest", DEST[0], "--object-path", DEST[1], "--xml")
    assert live.returncode == 0, live.stderr
    assert _interfaces(live.stdout) == _interfaces(manager_doc)
    assert set(_interfaces(manager_doc)) == {
        *names.FAMILY_INTERFACES.values(),
        names.OBJECT_MANAGER,
    }
    # A request object exists only while its syscall runs: start one and introspect it.
    with BusClient(private_bus.address) as client:
        stream = client.stream(
            "llm.chat",
            {"messages": [{"role": "user", "content": "Write a long story"}], "max_tokens": 64},
        )
        next(stream)
        # Only the owner may see it (to others it does not exist, not even as a child node of
        # the introspection data): find and introspect it through the owner's own connection.
        (path,) = client._bus.con.call_sync(
            names.BUS_NAME,
            DEST[1],
            names.OBJECT_MANAGER,
            "GetManagedObjects",
            None,
            None,
            0,
            -1,
            None,
        ).unpack()[0]
        xml = client._bus.con.call_sync(
            names.BUS_NAME,
            path,
            "org.freedesktop.DBus.Introspectable",
            "Introspect",
            None,
            None,
            0,
            -1,
            None,
        ).unpack()[0]
        for _ in stream:
            pass
    assert _interfaces(xml) == _interfaces(request_doc)


# --- 2. independent clients agree with the socket ---------------------------------------------


def test_busctl_status_and_properties_equal_the_socket(
    private_bus: PrivateBus, bus_daemon: Daemon
) -> None:
    over_bus = plain(busctl(private_bus, "call", *DEST, "org.aiosd.Daemon1.System", "Status"))
    status = over_bus[0]
    with Client(bus_daemon.socket_path) as c:
        sock = c.call("system.status")
    for key in (
        "version",
        "pid",
        "state",
        "models",
        "default_model",
        "caller_uid",
        "caller_role",
        "running",
        "waiting",
    ):
        assert status[key] == sock[key], key
    props = {}
    for prop in ("Version", "Models", "DefaultModel", "State", "QueueLength", "Running"):
        props[prop] = plain(
            busctl(private_bus, "get-property", *DEST, "org.aiosd.Daemon1.System", prop)
        )
    assert props["Version"] == sock["version"]
    assert props["Models"] == sock["models"]
    assert props["DefaultModel"] == sock["default_model"]
    assert props["State"] == "running"
    assert props["QueueLength"] == 0 and props["Running"] == 0


def test_busctl_chat_equals_the_socket_chat(private_bus: PrivateBus, bus_daemon: Daemon) -> None:
    prompt = "Name three Linux init systems"
    over_bus = plain(
        busctl(
            private_bus,
            "call",
            *DEST,
            "org.aiosd.Daemon1.LLM",
            "Chat",
            "aa{sv}a{sv}",
            "1",
            "2",
            "role",
            "s",
            "user",
            "content",
            "s",
            prompt,
            "2",
            "max_tokens",
            "x",
            "24",
            "seed",
            "x",
            "7",
        )
    )[0]
    with Client(bus_daemon.socket_path) as c:
        sock = c.call(
            "llm.chat",
            {"messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "seed": 7},
        )
    assert len(sock["message"]["content"]) > 10
    assert over_bus["message"]["content"] == sock["message"]["content"]
    assert (
        over_bus["usage"]
        == sock["usage"]
        == {"prompt_tokens": sock["usage"]["prompt_tokens"], "completion_tokens": 24}
    )
    assert over_bus["finish_reason"] == sock["finish_reason"]


def test_aiosctl_bus_and_socket_agree(private_bus: PrivateBus, bus_daemon: Daemon) -> None:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": private_bus.address}

    def aiosctl(*args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "aiosd.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=REPO,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    ask = ["ask", "--max-tokens", "20", "--seed", "3", "Name three Linux init systems"]
    assert aiosctl("--bus", *ask) == aiosctl("--socket", str(bus_daemon.socket_path), *ask)
    by_bus = json.loads(aiosctl("--bus", "status", "--json"))
    by_socket = json.loads(aiosctl("--socket", str(bus_daemon.socket_path), "status", "--json"))
    for key in ("version", "pid", "models", "default_model", "caller_uid", "caller_role"):
        assert by_bus[key] == by_socket[key]


# --- 3. streaming: every token, in order, to its owner only -----------------------------------


MONITOR = "gdbus monitor --address {address} --dest org.aiosd.Daemon1"


def test_token_signals_arrive_in_order_and_only_to_their_owner(
    private_bus: PrivateBus, bus_daemon: Daemon, unix_users: dict[str, UnixUser]
) -> None:
    other = unix_users["in"]
    monitor = subprocess.Popen(
        ["gdbus", "monitor", "--address", private_bus.address, "--dest", names.BUS_NAME],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        user=other.uid,
        group=other.gid,
        extra_groups=other.groups,
        cwd="/",
    )
    try:
        time.sleep(0.5)  # let the monitor subscribe
        total = 0
        with BusClient(private_bus.address) as client:
            for i in range(5):
                notes = list(
                    client.stream(
                        "llm.chat",
                        {
                            "messages": [
                                {"role": "user", "content": f"Write a very long story, part {i}"}
                            ],
                            "max_tokens": 250,
                        },
                    )
                )
                result = client.last_result
                assert [n["seq"] for n in notes] == list(range(len(notes)))
                assert "".join(n["content"] for n in notes) == result["message"]["content"]
                total += len(notes)
        assert total >= 1000, f"only {total} Token signals"
        time.sleep(0.5)
    finally:
        monitor.terminate()
        seen, _ = monitor.communicate(timeout=10)
    # The other user's connection saw the broadcast property changes, but nothing private.
    assert "PropertiesChanged" in seen
    assert "Token" not in seen and "Finished" not in seen and "InterfacesAdded" not in seen


# --- 4. identity from the bus ------------------------------------------------------------------


def test_other_users_are_refused_or_served_by_group(
    private_bus: PrivateBus, bus_daemon: Daemon, unix_users: dict[str, UnixUser]
) -> None:
    call = [
        "call",
        "--dest",
        DEST[0],
        "--object-path",
        DEST[1],
        "--method",
        "org.aiosd.Daemon1.System.Status",
    ]
    out = gdbus(private_bus, *call, user=unix_users["out"])
    assert out.returncode != 0
    assert "org.aiosd.Daemon1.Error.PermissionDenied" in out.stderr
    assert f"uid {unix_users['out'].uid}" in out.stderr
    assert "Traceback" not in out.stderr and ".py" not in out.stderr
    served = gdbus(private_bus, *call, user=unix_users["in"])
    assert served.returncode == 0, served.stderr
    assert f"'caller_uid': <int64 {unix_users['in'].uid}>" in served.stdout
    assert "'caller_role': <'user'>" in served.stdout


# --- 5. bad arguments ----------------------------------------------------------------------------


def test_bad_arguments_get_named_errors_and_the_daemon_keeps_serving(
    private_bus: PrivateBus, bus_daemon: Daemon
) -> None:
    chat = [
        "call",
        "--dest",
        DEST[0],
        "--object-path",
        DEST[1],
        "--method",
        "org.aiosd.Daemon1.LLM.Chat",
    ]
    # gdbus checks types itself, so send the wrong type with a raw call.
    from gi.repository import Gio, GLib

    con = Gio.DBusConnection.new_for_address_sync(
        private_bus.address,
        Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
        None,
        None,
    )
    with pytest.raises(GLib.Error) as wrong_type:
        con.call_sync(
            DEST[0],
            DEST[1],
            "org.aiosd.Daemon1.LLM",
            "Chat",
            GLib.Variant("(s)", ("not a list",)),
            None,
            0,
            -1,
            None,
        )
    assert (
        Gio.DBusError.get_remote_error(wrong_type.value) == "org.freedesktop.DBus.Error.InvalidArgs"
    )
    con.close_sync(None)
    unknown_key = gdbus(
        private_bus, *chat, "[{'role': <'user'>, 'content': <'hi'>}]", "{'colour': <'red'>}"
    )
    assert "org.aiosd.Daemon1.Error.InvalidArgs" in unknown_key.stderr
    assert "colour" in unknown_key.stderr
    stream_key = gdbus(
        private_bus, *chat, "[{'role': <'user'>, 'content': <'hi'>}]", "{'stream': <true>}"
    )
    assert "org.aiosd.Daemon1.Error.InvalidArgs" in stream_key.stderr
    assert "StartChat" in stream_key.stderr
    # A method that does not stream has no Start twin to point to.
    get = [*chat[:-1], "org.aiosd.Daemon1.Storage.Get", "'notes'", "'k'", "{'stream': <true>}"]
    no_twin = gdbus(private_bus, *get)
    assert "options.stream: not an option on D-Bus" in no_twin.stderr
    assert "Start" not in no_twin.stderr
    bad_role = gdbus(private_bus, *chat, "[{'role': <'robot'>, 'content': <'hi'>}]", "{}")
    assert "org.aiosd.Daemon1.Error.InvalidArgs" in bad_role.stderr
    assert "messages.0.role" in bad_role.stderr
    with BusClient(private_bus.address) as client:
        from aiosd.errors import InvalidParams

        with pytest.raises(InvalidParams, match="messages.0.content"):
            client.call(
                "llm.chat", {"messages": [{"role": "user", "content": "x" * (4 * 1024 * 1024 + 1)}]}
            )
        for out in (unknown_key, stream_key, no_twin, bad_role):
            assert "Traceback" not in out.stderr and ".py" not in out.stderr
        assert client.call("system.status")["state"] == "running"


# --- every syscall is reachable over D-Bus -----------------------------------------------------


def test_every_syscall_is_reachable_over_dbus(private_bus: PrivateBus, bus_daemon: Daemon) -> None:
    with BusClient(private_bus.address) as client:
        assert call_every_syscall(client.call) == set(SYSCALLS)
        program = "sleep 0.5; echo one; echo two"
        streamed = {
            "llm.chat": lambda: {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            "agent.logs": lambda: {
                "aid": client.call(
                    "agent.spawn",
                    {"argv": ["/bin/sh", "-c", program], "cwd": "/", "user": "nobody"},
                )["aid"],
                "tail": 0,
            },
            # Its only notifications are confirmation requests, which travel as the
            # manager's ConfirmationRequested signal (tests/api/test_dbus_tools.py).
            "tool.call": lambda: {"name": "system.info", "arguments": {}},
        }
        assert {name for name, spec in SYSCALLS.items() if spec.streams} == set(streamed)
        for name, params in streamed.items():
            notes = list(client.stream(name, params()))
            if name == "tool.call":
                assert notes == [] and client.last_result["ok"]
                continue
            assert notes and client.last_result


def test_documented_desktop_client_example_runs(
    private_bus: PrivateBus, bus_daemon: Daemon
) -> None:
    text = (REPO / "docs" / "dbus.md").read_text()
    example = re.findall(r"```python\n(.*?)```", text, re.S)[-1]
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": private_bus.address}
    out = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "'completion_tokens'" in out.stdout and len(out.stdout) > 40


def test_binary_values_travel_as_bytes_on_dbus(private_bus: PrivateBus, bus_daemon: Daemon) -> None:
    import base64

    blob = bytes([0, 255, 1, 254, 10, 13, 0])
    put = plain(
        busctl(
            private_bus,
            "call",
            *DEST,
            "org.aiosd.Daemon1.Storage",
            "Put",
            "ssva{sv}",
            "bin",
            "blob",
            "ay",
            str(len(blob)),
            *[str(b) for b in blob],
            "0",
        )
    )[0]
    assert put["size"] == len(blob)
    got = busctl(
        private_bus,
        "call",
        *DEST,
        "org.aiosd.Daemon1.Storage",
        "Get",
        "ssa{sv}",
        "bin",
        "blob",
        "0",
    )["data"][0]
    assert got["value"]["type"] == "ay" and bytes(got["value"]["data"]) == blob
    assert got["encoding"]["data"] == "base64"
    # The same entry over the socket: base64 text, the same bytes.
    with Client(bus_daemon.socket_path) as c:
        sock = c.call("storage.get", {"collection": "bin", "key": "blob"})
    assert sock["encoding"] == "base64" and base64.b64decode(sock["value"]) == blob
    # The D-Bus client reads the bytes back as the socket has them.
    with BusClient(private_bus.address) as client:
        assert client.call("storage.get", {"collection": "bin", "key": "blob"}) == sock
    # Text stays text on the bus.
    plain(
        busctl(
            private_bus,
            "call",
            *DEST,
            "org.aiosd.Daemon1.Storage",
            "Put",
            "ssva{sv}",
            "bin",
            "txt",
            "s",
            "hello",
            "0",
        )
    )
    got = busctl(
        private_bus, "call", *DEST, "org.aiosd.Daemon1.Storage", "Get", "ssa{sv}", "bin", "txt", "0"
    )["data"][0]
    assert got["value"] == {"type": "s", "data": "hello"}


# --- types come from the models, errors from the D-Bus specification ---------------------------


def _raw_call(address: str, iface: str, method: str, args: Any = None) -> Any:
    """One call on a fresh GDBus connection: the reply as it came (a GLib.Variant)."""
    from gi.repository import Gio

    con = Gio.DBusConnection.new_for_address_sync(
        address,
        Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
        None,
        None,
    )
    try:
        return con.call_sync(DEST[0], DEST[1], iface, method, args, None, 0, -1, None)
    finally:
        con.close_sync(None)


def _member_types(reply: Any) -> dict[str, str]:
    """name → the D-Bus type of each member of a reply's a{sv}."""
    result = reply.get_child_value(0)
    out = {}
    for i in range(result.n_children()):
        entry = result.get_child_value(i)
        out[entry.get_child_value(0).get_string()] = (
            entry.get_child_value(1).get_variant().get_type_string()
        )
    return out


def test_lists_have_their_declared_type_empty_or_not(
    private_bus: PrivateBus, bus_daemon: Daemon
) -> None:
    from gi.repository import GLib

    from aiosd.api.dbus.codec import signatures

    storage, memory = "org.aiosd.Daemon1.Storage", "org.aiosd.Daemon1.Memory"
    addr = private_bus.address
    empty_list = _member_types(
        _raw_call(addr, storage, "List", GLib.Variant("(sa{sv})", ("typed-empty", {})))
    )
    _raw_call(
        addr,
        storage,
        "Put",
        GLib.Variant("(ssva{sv})", ("typed-full", "k", GLib.Variant("s", "v"), {})),
    )
    full_list = _member_types(
        _raw_call(addr, storage, "List", GLib.Variant("(sa{sv})", ("typed-full", {})))
    )
    assert empty_list["entries"] == full_list["entries"] == "aa{sv}"
    assert "next" not in full_list  # null: left out, not retyped

    plain_entry = _member_types(
        _raw_call(addr, memory, "Add", GLib.Variant("(sa{sv})", ("untagged", {})))
    )
    tagged = {"tags": GLib.Variant("as", ["a", "b"])}
    tagged_entry = _member_types(
        _raw_call(addr, memory, "Add", GLib.Variant("(sa{sv})", ("tagged", tagged)))
    )
    declared = signatures(SYSCALLS["memory.add"].result)
    assert plain_entry == tagged_entry == {k: declared[k] for k in plain_entry}
    assert plain_entry["tags"] == "as" and plain_entry["evicted"] == "ax"

    queue = _raw_call(addr, "org.aiosd.Daemon1.System", "Queue").get_child_value(0)
    models = queue.lookup_value("models", None)
    assert models.get_type_string() == "aa{sv}"
    running = models.get_child_value(0).lookup_value("running", None)
    assert running.get_type_string() == "aa{sv}"  # empty here: still a list of objects


def test_properties_and_unknown_members_answer_with_the_standard_errors(
    private_bus: PrivateBus, bus_daemon: Daemon
) -> None:
    from gi.repository import Gio, GLib

    system = "org.aiosd.Daemon1.System"
    props = "org.freedesktop.DBus.Properties"

    def error_of(iface: str, method: str, args: Any = None) -> str:
        with pytest.raises(GLib.Error) as err:
            _raw_call(private_bus.address, iface, method, args)
        return str(Gio.DBusError.get_remote_error(err.value))

    set_version = GLib.Variant("(ssv)", (system, "Version", GLib.Variant("s", "9")))
    assert error_of(props, "Set", set_version) == "org.freedesktop.DBus.Error.PropertyReadOnly"
    unknown = GLib.Variant("(ss)", (system, "Colour"))
    assert error_of(props, "Get", unknown) == "org.freedesktop.DBus.Error.UnknownProperty"
    other = GLib.Variant("(s)", ("org.example.Nothing",))
    assert error_of(props, "GetAll", other) == "org.freedesktop.DBus.Error.UnknownInterface"
    assert error_of(system, "Reboot") == "org.freedesktop.DBus.Error.UnknownMethod"
    assert error_of("org.example.Nothing", "Do") == "org.freedesktop.DBus.Error.UnknownMethod"
    # Reading still works, and the LLM interface simply has no properties.
    got = _raw_call(private_bus.address, props, "Get", GLib.Variant("(ss)", (system, "State")))
    assert got.unpack() == ("running",)
    none = _raw_call(
        private_bus.address, props, "GetAll", GLib.Variant("(s)", ("org.aiosd.Daemon1.LLM",))
    )
    assert none.unpack() == ({},)
    # A request object's properties are read-only too (asked through its owner's connection).
    with BusClient(private_bus.address) as client:
        stream = client.stream(
            "llm.chat",
            {"messages": [{"role": "user", "content": "Write a long story"}], "max_tokens": 64},
        )
        next(stream)
        objects = client._bus.con.call_sync(
            names.BUS_NAME,
            DEST[1],
            names.OBJECT_MANAGER,
            "GetManagedObjects",
            None,
            None,
            0,
            -1,
            None,
        ).unpack()[0]
        (path,) = objects
        with pytest.raises(GLib.Error) as err:
            client._bus.con.call_sync(
                names.BUS_NAME,
                path,
                props,
                "Set",
                GLib.Variant("(ssv)", (names.REQUEST_INTERFACE, "State", GLib.Variant("s", "x"))),
                None,
                0,
                -1,
                None,
            )
        assert (
            Gio.DBusError.get_remote_error(err.value)
            == "org.freedesktop.DBus.Error.PropertyReadOnly"
        )
        for _ in stream:
            pass


def test_values_the_bus_cannot_carry_are_refused_by_name_never_changed(
    private_bus: PrivateBus, bus_daemon: Daemon
) -> None:
    from gi.repository import Gio, GLib

    from aiosd.api.dbus.variants import bytes_variant
    from aiosd.errors import InvalidParams, NotFound
    from aiosd.kernel.syscall_base import MAX_NESTING

    addr = private_bus.address
    # Bytes inside free-form metadata: not JSON, so not something storage can keep.
    metadata = {"metadata": GLib.Variant("a{sv}", {"blob": bytes_variant(b"\x01\x02")})}
    put = GLib.Variant("(ssva{sv})", ("nul", "meta", GLib.Variant("s", "v"), metadata))
    with pytest.raises(GLib.Error) as err:
        _raw_call(addr, "org.aiosd.Daemon1.Storage", "Put", put)
    assert Gio.DBusError.get_remote_error(err.value) == "org.aiosd.Daemon1.Error.InvalidArgs"
    assert "metadata.blob: bytes" in err.value.message
    # Text holding NUL: D-Bus would cut it, so no transport lets it in.
    entry = {"collection": "nul", "key": "text"}
    with Client(bus_daemon.socket_path) as c:
        with pytest.raises(InvalidParams, match="value: text contains NUL"):
            c.call("storage.put", {**entry, "value": "a\x00b"})
        with pytest.raises(NotFound):
            c.call("storage.get", entry)
    # The deepest metadata the door lets in travels back over D-Bus unchanged.
    deepest: dict[str, Any] = {"leaf": 2**63 - 1}
    for _ in range(MAX_NESTING - 2):
        deepest = {"a": deepest}
    deep = {"collection": "nul", "key": "deep"}
    with Client(bus_daemon.socket_path) as c:
        c.call("storage.put", {**deep, "value": "v", "metadata": deepest})
        with pytest.raises(InvalidParams, match="nested deeper"):
            c.call("storage.put", {**deep, "value": "v", "metadata": {"a": deepest}})
    with BusClient(addr) as client:
        assert client.call("storage.get", deep)["metadata"] == deepest
        assert client.call("system.status")["state"] == "running"
    # An empty interface name reads the property from whichever interface has it.
    props = GLib.Variant("(ss)", ("", "State"))
    assert _raw_call(addr, names.DBUS_PROPERTIES, "Get", props).unpack() == ("running",)


class _EchoParams(Params):
    words: list[str] = []


class _EchoResult(Result):
    said: list[str]
    maybe: list[int | None]


class _Demo:
    """A syscall family of this test's own, in a table injected into the kernel."""

    def echo(self, p: _EchoParams, c: Caller, emit: object) -> _EchoResult:
        return _EchoResult(said=p.words, maybe=[len(p.words), None] if p.words else [])


def test_the_front_end_serves_the_kernels_own_table() -> None:
    from gi.repository import GLib

    bus = PrivateBus(Path(tempfile.mkdtemp(prefix="aiosd-table-")) / "bus")
    bus.start()
    echo = Syscall(
        "demo.echo", _EchoParams, _EchoResult, Permission.user, _Demo.echo, "Echo.", _Demo
    )
    table = {**SYSCALLS, echo.name: echo}

    def echo_call(options: dict[str, Any]) -> Any:
        args = GLib.Variant("(a{sv})", (options,))
        return _raw_call(bus.address, "org.aiosd.Daemon1.Demo", "Echo", args)

    async def serve() -> tuple[Any, Any]:
        kernel = Kernel(Config(), backends={}, syscalls=table, families={_Demo: _Demo()})
        await kernel.start()
        front = DBusFrontend(kernel, DBusConfig(bus=bus.address), asyncio.get_running_loop())
        await front.start()
        try:
            empty = await asyncio.to_thread(echo_call, {})
            full = await asyncio.to_thread(echo_call, {"words": GLib.Variant("as", ["a", "b"])})
        finally:
            await front.close()
            await kernel.stop(1.0, 1.0)
        return empty, full

    try:
        empty, full = asyncio.run(serve())
    finally:
        bus.stop()
    assert _member_types(empty) == _member_types(full) == {"said": "as", "maybe": "aax"}
    assert full.get_child_value(0).lookup_value("maybe", None).unpack() == [[2], []]

"""Scenario ``rss``: does the daemon's memory stay flat under ordinary calls repeated?

30,000 calls per transport, after 1,000 of warm-up, from a member user and from a user with no
role: over D-Bus ``Properties.GetAll``, ``Storage.Get``, ``Memory.Add`` and ``Memory.Delete``,
``StartChat`` with max_tokens 1 (followed to its ``Finished`` signal) and the no-role user's
refused ``System.Status``; over the socket the same syscalls.  The baseline is measured in the
same run: VmRSS growth per call over the first 5,000 calls after warm-up, against growth per
call over the rest.  A daemon that keeps nothing per call is flat after warm-up (noise only).
"""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from bench.common import Goal, Options, Report, Table
from bench.fuzz_env import setting
from bench.peer import Peer, rss

#: Calls of the mix that failed, by transport, call and error (a run shows them in a note).
ERRORS: Counter[str] = Counter()


class _Rpc:
    """A blocking JSON-RPC client on a connection a peer made."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.file = sock.makefile("rb")
        self.n = 0

    def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.n += 1
        msg = {"jsonrpc": "2.0", "id": self.n, "method": method, "params": params}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"the daemon closed the connection ({method})")
            reply: dict[str, Any] = json.loads(line)
            if reply.get("id") == self.n:
                return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _socket_ops(member: _Rpc, outsider: _Rpc) -> list[Callable[[], object]]:
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    note = {"collection": "rss", "key": "k"}

    def add_delete() -> None:
        added = member.call("memory.add", {"content": "remember this", "space": "rss"})
        if "result" not in added:
            ERRORS[f"socket memory.add {added['error']['code']}: {added['error']['message']}"] += 1
            return
        member.call("memory.delete", {"id": added["result"]["id"], "space": "rss"})

    return [
        lambda: outsider.call("system.status", {}),
        lambda: member.call("storage.get", note),
        add_delete,
        lambda: member.call("system.status", {}),
        lambda: member.call("llm.chat", chat),
    ]


def _bus_ops(member: Any, outsider: Any) -> list[Callable[[], object]]:
    from gi.repository import Gio, GLib

    from aiosd.api.dbus import names

    done: set[str] = set()

    def on_signal(con: Any, sender: str, path: str, iface: str, sig: str, *rest: Any) -> None:
        if sig in ("Finished", "Failed"):
            done.add(path)

    member.signal_subscribe(names.BUS_NAME, names.REQUEST_INTERFACE, None, None, None,
                            Gio.DBusSignalFlags.NONE, on_signal)  # fmt: skip

    def call(con: Any, iface: str, method: str, args: GLib.Variant | None) -> Any:
        try:
            return con.call_sync(names.BUS_NAME, names.OBJECT_PATH, iface, method, args, None,
                                 Gio.DBusCallFlags.NONE, 60_000, None)  # fmt: skip
        except GLib.Error as exc:
            return exc

    storage, memory = names.FAMILY_INTERFACES["storage"], names.FAMILY_INTERFACES["memory"]
    opts = {"space": GLib.Variant("s", "rss-bus")}

    def add_delete() -> None:
        added = call(member, memory, "Add", GLib.Variant("(sa{sv})", ("remember this", opts)))
        if isinstance(added, GLib.Error):
            ERRORS[f"dbus Memory.Add: {added.message}"] += 1
            return
        entry = added.unpack()[0]["id"]
        call(member, memory, "Delete", GLib.Variant("(xa{sv})", (entry, opts)))

    def chat() -> None:
        messages = [{"role": GLib.Variant("s", "user"), "content": GLib.Variant("s", "hi")}]
        args = GLib.Variant("(aa{sv}a{sv})", (messages, {"max_tokens": GLib.Variant("x", 1)}))
        path = call(member, names.FAMILY_INTERFACES["llm"], "StartChat", args).unpack()[0]
        ctx = GLib.MainContext.default()
        deadline = time.monotonic() + 60
        while path not in done and time.monotonic() < deadline:
            if not ctx.iteration(False):
                time.sleep(0.0005)
        done.discard(path)

    props = GLib.Variant("(s)", (names.PROPERTIES_INTERFACE,))
    return [
        lambda: call(outsider, names.PROPERTIES_INTERFACE, "Status", None),
        lambda: member.call_sync(names.BUS_NAME, names.OBJECT_PATH, names.DBUS_PROPERTIES,
                                 "GetAll", props, None, Gio.DBusCallFlags.NONE, 60_000, None),
        lambda: call(member, storage, "Get", GLib.Variant("(ssa{sv})", ("rss", "k", {}))),
        add_delete,
        chat,
    ]  # fmt: skip


def _measure(pid: int, ops: list[Callable[[], object]], warm: int, base: int, total: int
             ) -> tuple[float, float, int, int, int, float]:  # fmt: skip
    """(bytes/call over the first ``base`` calls, over the rest, RSS at 0, base, end, s)."""
    for i in range(warm):
        ops[i % len(ops)]()
    r0 = rss(pid)["VmRSS"]
    t0 = time.monotonic()
    for i in range(base):
        ops[i % len(ops)]()
    r1 = rss(pid)["VmRSS"]
    for i in range(base, total):
        ops[i % len(ops)]()
    r2 = rss(pid)["VmRSS"]
    return (r1 - r0) / base, (r2 - r1) / (total - base), r0, r1, r2, time.monotonic() - t0


def run(opts: Options) -> Report:
    """Measure and report."""
    from bench.fuzz_dbus import bus_connection

    total, base, warm = (30_000, 5_000, 1_000) if not opts.quick else (3_000, 1_000, 300)
    report = Report("rss")
    table = Table(
        f"VmRSS over {total} calls per transport after {warm} of warm-up (chat every 5th call)",
        ["transport", "first MiB", f"after {base} MiB", "end MiB",
         f"B/call first {base}", "B/call rest", "seconds"],
    )  # fmt: skip
    with setting(opts.workdir) as s:
        pid = s.daemon.pid
        p_member, p_out = Peer(s.member, s.socket_path), Peer(s.no_role, s.socket_path)
        member, outsider = _Rpc(p_member.socket()), _Rpc(p_out.socket())
        try:
            member.call("storage.put", {"collection": "rss", "key": "k", "value": "v" * 200})
            b1, b2, r0, r1, r2, secs = _measure(pid, _socket_ops(member, outsider), warm, base,
                                                total)  # fmt: skip
        finally:
            member.close()
            outsider.close()
            p_member.close()
            p_out.close()
        table.add("socket", r0 / 2**20, r1 / 2**20, r2 / 2**20, b1, b2, secs)
        results = {"socket": b2}
        bus_member, bp = bus_connection(s.member, s.bus_socket)
        bus_out, bo = bus_connection(s.no_role, s.bus_socket)
        try:
            from gi.repository import GLib

            from aiosd.api.dbus import names

            bus_member.call_sync(names.BUS_NAME, names.OBJECT_PATH,
                                 names.FAMILY_INTERFACES["storage"], "Put",
                                 GLib.Variant("(ssva{sv})", ("rss", "k", GLib.Variant("s", "v"),
                                                             {})),
                                 None, 0, 60_000, None)  # fmt: skip
            b1, b2, r0, r1, r2, secs = _measure(pid, _bus_ops(bus_member, bus_out), warm, base,
                                                total)  # fmt: skip
        finally:
            bus_member.close_sync(None)
            bus_out.close_sync(None)
            bp.close()
            bo.close()
        table.add("dbus", r0 / 2**20, r1 / 2**20, r2 / 2**20, b1, b2, secs)
        results["dbus"] = b2
    report.tables.append(table)
    for name, per_call in results.items():
        # Flat within noise: under 64 bytes a call (1.5 MiB over 25,000 calls).
        report.goals.append(Goal(f"{name} VmRSS growth after warm-up, B/call", per_call, "< 64",
                                 per_call < 64))  # fmt: skip
    report.notes.append("a steady positive B/call on the rest is memory kept per call")
    for text, count in ERRORS.most_common(10):
        report.notes.append(f"{count} calls failed: {text[:200]}")
    return report

"""Hostile calls on D-Bus: every method of every interface of ``org.aiosd.Daemon1``.

The methods come from the manager object's live introspection and the request objects'
declaration (aiosd/api/dbus/introspection.py); the parameters of the syscall methods, from the
syscall table.  Each call is made with a low-level client (``Gio.DBusConnection.call_sync`` and
hand-built ``GLib.Variant`` arguments), so wrong signatures reach the bus as they are: too few
or too many arguments, arguments of other types, and, with the right signature, extreme values
(64-bit limits, NaN and infinities, 1 MB strings, deep nesting, options of every type, unknown
options).  ``Properties.Get``/``GetAll``/``Set``, ``Introspect`` and ``Peer`` calls go to the
manager, to the caller's own request objects, to other users' and to paths where nothing is.

Deterministic from the seed, like bench/fuzz.py; :class:`BusFuzzer` checks that every call gets
one reply (a return or an error), never an internal error or a traceback, and the error the
daemon's rules call for where they are specific (wrong signature: the standard InvalidArgs;
a caller with no role: PermissionDenied).
"""

from __future__ import annotations

import math
import random
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gi.repository import Gio, GLib

from aiosd.api.dbus import names
from aiosd.api.dbus.introspection import bus_methods, request_xml
from bench.fuzz import FLOATS, MB, STRINGS, Failure, Tally
from bench.peer import Identity, Peer

INTERNAL = "org.aiosd.Daemon1.Error.Internal"
PERMISSION_DENIED = "org.aiosd.Daemon1.Error.PermissionDenied"
INVALID_ARGS = names.DBUS_INVALID_ARGS
#: What a caller with no role may be answered for a property of the manager.
REFUSED = frozenset({PERMISSION_DENIED, names.DBUS_ACCESS_DENIED})


def bus_connection(who: Identity, bus_socket: Path | str) -> tuple[Gio.DBusConnection, Peer]:
    """A bus connection authenticated as ``who`` (its peer child ends with :meth:`Peer.close`)."""
    peer = Peer(who, bus_socket, dbus=True)
    try:
        sock = Gio.Socket.new_from_fd(peer.fd)
        stream = sock.connection_factory_create_connection()
        con = Gio.DBusConnection.new_sync(
            stream, None, Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None
        )
    except BaseException:
        peer.close()
        raise
    con.set_exit_on_close(False)
    return con, peer


class BusDialer:
    """Bus connections as ``who``, one at a time (each call ends the previous one)."""

    def __init__(self, who: Identity, bus_socket: Path | str) -> None:
        self.who = who
        self.bus_socket = bus_socket
        self.con: Gio.DBusConnection | None = None
        self.peer: Peer | None = None

    def __call__(self) -> Gio.DBusConnection:
        """A new connection."""
        self.close()
        self.con, self.peer = bus_connection(self.who, self.bus_socket)
        return self.con

    def close(self) -> None:
        """Close the current connection and end its child."""
        if self.con is not None and not self.con.is_closed():
            self.con.close_sync(None)
        if self.peer is not None:
            self.peer.close()
        self.con = self.peer = None


@dataclass(frozen=True)
class Method:
    """One method of one interface: its input argument types."""

    interface: str
    name: str
    args: tuple[str, ...]


def methods_of(xml: str) -> list[Method]:
    """Every method an introspection document declares, standard interfaces included."""
    out = []
    for iface in ET.fromstring(xml).findall("interface"):
        for m in iface.findall("method"):
            args = tuple(
                a.get("type", "") for a in m.findall("arg") if a.get("direction", "in") == "in"
            )
            out.append(Method(iface.get("name", ""), m.get("name", ""), args))
    return out


#: The standard interfaces every object answers (GDBus's own, and aiosd's Properties).
STANDARD = [
    Method(names.DBUS_PROPERTIES, "Get", ("s", "s")),
    Method(names.DBUS_PROPERTIES, "GetAll", ("s",)),
    Method(names.DBUS_PROPERTIES, "Set", ("s", "s", "v")),
    Method(names.DBUS_INTROSPECTABLE, "Introspect", ()),
    Method(names.DBUS_PEER, "Ping", ()),
    Method(names.DBUS_PEER, "GetMachineId", ()),
]

# --- values ----------------------------------------------------------------------------------

#: Strings a D-Bus string can hold (valid UTF-8 without NUL), and a 1 MB one.
BUS_STRINGS = tuple(
    s for s in STRINGS if "\x00" not in s and not any(0xD800 <= ord(ch) <= 0xDFFF for ch in s)
) + ("x" * MB,)
INT64 = (0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63))
#: max_tokens values that never start a long generation: invalid ones, or tiny.
SAFE_TOKENS = (
    GLib.Variant("x", 0),
    GLib.Variant("x", -1),
    GLib.Variant("x", 1),
    GLib.Variant("x", 2**31),
    GLib.Variant("x", 2**63 - 1),
    GLib.Variant("x", -(2**63)),
    GLib.Variant("t", 2**64 - 1),
    GLib.Variant("d", math.nan),
    GLib.Variant("d", math.inf),
    GLib.Variant("d", 1.5),
    GLib.Variant("s", "many"),
    GLib.Variant("b", True),
    GLib.Variant("ay", b"\x00\x01"),
)


def _nested(depth: int) -> GLib.Variant:
    value = GLib.Variant("s", "leaf")
    for _ in range(depth):
        value = GLib.Variant("av", [value])
    return value


def any_variant(rng: random.Random) -> GLib.Variant:
    """A variant of a random type, often an extreme value of it."""
    kind = rng.randrange(16)
    if kind == 0:
        return GLib.Variant("s", rng.choice(BUS_STRINGS))
    if kind == 1:
        return GLib.Variant("x", rng.choice(INT64))
    if kind == 2:
        return GLib.Variant("t", rng.choice((0, 2**63, 2**64 - 1)))
    if kind == 3:
        return GLib.Variant("d", rng.choice(FLOATS))
    if kind == 4:
        return GLib.Variant("b", rng.random() < 0.5)
    if kind == 5:
        return GLib.Variant("ay", rng.choice((b"", b"\x00", b"\xff\xfe" * 100, b"a\x00b")))
    if kind == 6:
        return GLib.Variant("as", rng.choice(([], [""], ["a"] * 40, ["k" * 100])))
    if kind == 7:
        return GLib.Variant("ax", [rng.choice(INT64) for _ in range(rng.randrange(4))])
    if kind == 8:
        return GLib.Variant("a{sv}", {"a": GLib.Variant("s", "b"), "": GLib.Variant("x", 1)})
    if kind == 9:
        return _nested(rng.choice((10, 30)))
    if kind == 10:
        return GLib.Variant("aa{sv}", [{"role": GLib.Variant("x", 1)}])
    if kind == 11:
        return GLib.Variant("(sx)", ("s", 1))
    if kind == 12:
        return GLib.Variant("o", rng.choice(("/", names.REQUEST_PATH_PREFIX + "/1")))
    if kind == 13:
        return GLib.Variant("g", "a{sv}")
    if kind == 14:
        return GLib.Variant("u", 2**32 - 1)
    return GLib.Variant("i", -(2**31))


def _value(rng: random.Random, sig: str, method: tuple[str, str] | None) -> Any:
    """A Python value GLib packs as ``sig`` (extreme where it can be)."""
    if sig == "s":
        return rng.choice(BUS_STRINGS)
    if sig == "x":
        return rng.choice(INT64)
    if sig == "v":
        return any_variant(rng)
    if sig == "aa{sv}":
        return [
            _options(rng, None, ("role", "content", "tool_calls")) for _ in range(rng.randrange(3))
        ]
    if sig == "a{sv}":
        return _options(rng, method, ())
    if sig == "o":
        return rng.choice(("/", names.OBJECT_PATH))
    raise ValueError(f"no generator for D-Bus type {sig}")


def _option_keys(method: tuple[str, str] | None) -> tuple[str, ...]:
    bm = bus_methods().get(method) if method is not None else None
    if bm is None:
        return ()
    required = {n for n, _ in bm.args}
    return tuple(k for k in bm.syscall.params.model_fields if k not in required)


def _options(
    rng: random.Random, method: tuple[str, str] | None, keys: tuple[str, ...]
) -> dict[str, GLib.Variant]:
    """An ``a{sv}``: some of the declared keys (or ``keys``), odd values, now and then a key
    that does not exist."""
    pool = list(keys or _option_keys(method)) or ["x"]
    out: dict[str, GLib.Variant] = {}
    for _ in range(rng.randrange(1, 4)):
        out[rng.choice(pool)] = any_variant(rng)
    if rng.random() < 0.15:
        out[rng.choice(("uid", "stream", "", "k" * 1000, "é"))] = any_variant(rng)
    if method is not None and method[1] in ("Chat", "StartChat"):
        out["max_tokens"] = rng.choice(SAFE_TOKENS) if "max_tokens" in out else GLib.Variant("x", 1)
    return out


def _wrong(rng: random.Random, args: tuple[str, ...]) -> str:
    """A signature that is not ``args``."""
    right = "".join(args)
    choices = [
        "",
        "s",
        "ay",
        "x",
        right + "s",
        "".join("s" for _ in args) + ("" if args else "s"),
        right.replace("a{sv}", "as"),
        right.replace("v", "s"),
        right.replace("x", "i"),
        right.replace("s", "x", 1),
        "a{sv}" * 3,
    ]
    if args:
        choices.append("".join(args[:-1]))
    choices = [c for c in choices if c != right]
    return rng.choice(choices)


def _end(sig: str, i: int) -> int:
    """Where the complete type starting at ``sig[i]`` ends."""
    if sig[i] == "a":
        return _end(sig, i + 1)
    if sig[i] in "({":
        close = ")" if sig[i] == "(" else "}"
        i += 1
        while sig[i] != close:
            i = _end(sig, i)
        return i + 1
    return i + 1


def _plain(sig: str) -> tuple[Any, ...]:
    """Plain values for every complete type of ``sig`` (a signature without parentheses)."""
    basic = {"s": "x", "o": "/", "g": "s", "b": True, "d": 1.0}
    out: list[Any] = []
    i = 0
    while i < len(sig):
        j = _end(sig, i)
        t = sig[i:j]
        if t in basic:
            out.append(basic[t])
        elif t in "yxitunqh":
            out.append(1)
        elif t == "v":
            out.append(GLib.Variant("s", "v"))
        elif t.startswith("a{"):
            out.append({})
        elif t.startswith("a"):
            out.append([])
        else:  # a struct
            out.append(_plain(t[1:-1]))
        i = j
    return tuple(out)


# --- cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BusCase:
    """One call and what may come back."""

    label: str
    path: str
    interface: str
    method: str
    args: GLib.Variant | None
    #: Error names allowed (None: anything but an internal error, success included).
    expect: frozenset[str] | None = None


@dataclass
class Targets:
    """Object paths to aim at: the caller's own requests and other users', as they appear."""

    own: list[str] = field(default_factory=list)
    others: list[str] = field(default_factory=list)

    def pick(self, rng: random.Random) -> str:
        """A path: the manager, a request object (live or gone), or nothing at all."""
        pool = [
            names.OBJECT_PATH,
            names.OBJECT_PATH,
            names.REQUEST_PATH_PREFIX,
            names.REQUEST_PATH_PREFIX + "/999999999",
            names.REQUEST_PATH_PREFIX + "/0",
            "/",
            "/org/aiosd",
            names.OBJECT_PATH + "/nothing",
        ]
        pool += self.own[-4:] + self.others[-4:]
        return rng.choice(pool)


def bus_cases(
    seed: int, count: int, manager_xml: str, targets: Targets, *, no_role: bool = False
) -> Iterator[BusCase]:
    """``count`` calls from ``seed``: first every method once with a wrong signature and once
    with extreme values, then random draws (a third on the standard interfaces)."""
    rng = random.Random(seed)
    manager = [m for m in methods_of(manager_xml) if not m.interface.startswith("org.freedesktop")]
    manager += [m for m in methods_of(manager_xml) if m.interface == names.OBJECT_MANAGER]
    request = methods_of(request_xml())
    sweep = [(m, w) for m in manager + request + STANDARD for w in (True, False)]
    n = 0
    while n < count:
        if sweep:
            method, wrong = sweep.pop(0)
        else:
            roll = rng.random()
            pool = STANDARD if roll < 0.33 else request if roll < 0.4 else manager
            method, wrong = rng.choice(pool), rng.random() < 0.3
        case = _case(rng, method, wrong, targets, no_role)
        if case is not None:
            n += 1
            yield case


def _case(
    rng: random.Random, m: Method, wrong: bool, targets: Targets, no_role: bool
) -> BusCase | None:
    ours = m.interface.startswith(names.INTERFACE_PREFIX) or m.interface == names.OBJECT_MANAGER
    if m.interface == names.REQUEST_INTERFACE or not ours:
        path = targets.pick(rng)
    else:
        path = names.OBJECT_PATH
    key = (m.interface, m.name)
    expect: frozenset[str] | None = None
    if wrong:
        sig = _wrong(rng, m.args)
        args = GLib.Variant(f"({sig})", _plain(sig)) if sig else None
        label = f"{m.interface}.{m.name} wrong signature ({sig}) on {path}"
        on_manager = ours and m.interface != names.REQUEST_INTERFACE
        if path == names.OBJECT_PATH and (on_manager or m.interface == names.DBUS_PROPERTIES):
            expect = frozenset({INVALID_ARGS})
    elif m.interface == names.DBUS_PROPERTIES:
        iface = rng.choice(
            ["", names.PROPERTIES_INTERFACE, names.REQUEST_INTERFACE, names.DBUS_PROPERTIES]
            + [names.FAMILY_INTERFACES["llm"], "no.such.Interface", "x" * 300, "é"]
        )
        prop = rng.choice(
            ["Version", "State", "Models", "QueueLength", "Syscall", "", "Nope", "y" * 300]
        )
        values: tuple[Any, ...] = {"Get": (iface, prop), "GetAll": (iface,)}.get(
            m.name, (iface, prop, any_variant(rng))
        )
        args = GLib.Variant(f"({''.join(m.args)})", values)
        label = f"Properties.{m.name}{values[:2]!r:.80} on {path}"
        if (
            no_role
            and path == names.OBJECT_PATH
            and m.name in ("Get", "GetAll")
            and iface in ("", names.PROPERTIES_INTERFACE)
            and (m.name == "GetAll" or prop in ("Version", "State", "Models", "QueueLength"))
        ):
            expect = REFUSED
    else:
        try:
            values = tuple(_value(rng, sig, key) for sig in m.args)
            args = GLib.Variant(f"({''.join(m.args)})", values) if m.args else None
        except (TypeError, ValueError, OverflowError):
            return None
        shown = ", ".join(_shown(v) for v in values)
        label = f"{m.interface}.{m.name}({shown}) on {path}"
        if no_role and key in bus_methods():
            expect = frozenset({PERMISSION_DENIED})
    return BusCase(label, path, m.interface, m.name, args, expect)


def _shown(value: Any) -> str:
    text = value.print_(True) if isinstance(value, GLib.Variant) else repr(value)
    return text if len(text) <= 50 else f"{text[:30]}...({len(text)} chars)"


# --- running ---------------------------------------------------------------------------------


class BusFuzzer:
    """Makes the calls one at a time on a connection ``dial()`` opens; checks each reply."""

    def __init__(
        self,
        dial: Callable[[], Gio.DBusConnection],
        targets: Targets | None = None,
        timeout_ms: int = 120_000,
    ) -> None:
        self.dial = dial
        self.targets = targets or Targets()
        self.timeout_ms = timeout_ms
        self.con: Gio.DBusConnection | None = None
        self.tally = Tally()

    def run(self, todo: Iterable[BusCase]) -> Tally:
        """Make every call; return the tally."""
        t0 = time.monotonic()
        try:
            for case in todo:
                if self.con is None or self.con.is_closed():
                    if self.con is not None:
                        self.tally.reconnects += 1
                    self.con = self.dial()
                self._one(case)
        finally:
            self.tally.seconds += time.monotonic() - t0
        return self.tally

    def _one(self, case: BusCase) -> None:
        t = self.tally
        assert self.con is not None
        t.sent += 1
        t.expected += 1
        try:
            reply = self.con.call_sync(
                names.BUS_NAME,
                case.path,
                case.interface,
                case.method,
                case.args,
                None,
                Gio.DBusCallFlags.NONE,
                self.timeout_ms,
                None,
            )
        except GLib.Error as exc:
            self._error(case, exc)
            return
        t.replies += 1
        t.outcomes["ok"] += 1
        if case.expect is not None:
            t.failures.append(Failure(case.label, "served, expected an error", reply.print_(True)))
        if case.method == "StartChat":
            self.targets.own.append(reply.unpack()[0])

    def _error(self, case: BusCase, exc: GLib.Error) -> None:
        t = self.tally
        name = Gio.DBusError.get_remote_error(exc)
        if name is None:
            if exc.matches(Gio.io_error_quark(), Gio.IOErrorEnum.TIMED_OUT):
                t.failures.append(Failure(case.label, "no reply", exc.message))
            elif self.con is not None and self.con.is_closed():
                t.failures.append(Failure(case.label, "our bus connection was closed", exc.message))
            else:  # refused on our side (GLib would not send it): not a call at all
                t.outcomes[f"local: {exc.message[:60]}"] += 1
                t.expected -= 1
            return
        t.replies += 1
        t.outcomes[name] += 1
        Gio.DBusError.strip_remote_error(exc)  # in place: the message without the name
        message = exc.message
        if name == INTERNAL:
            t.failures.append(Failure(case.label, "internal error", message))
        elif case.expect is not None and name not in case.expect:
            wanted = "/".join(sorted(case.expect))
            t.failures.append(Failure(case.label, f"{name}, expected {wanted}", message))
        if "Traceback" in message or 'File "' in message:
            t.failures.append(Failure(case.label, "traceback in a reply", message))

    def close(self) -> None:
        """Forget the connection (its dialer closes it)."""
        self.con = None


def name_owner(con: Gio.DBusConnection) -> str:
    """The unique name owning ``org.aiosd.Daemon1`` now."""
    reply = con.call_sync(
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "GetNameOwner",
        GLib.Variant("(s)", (names.BUS_NAME,)),
        GLib.VariantType("(s)"),
        Gio.DBusCallFlags.NONE,
        10_000,
        None,
    )
    owner: str = reply.unpack()[0]
    return owner


def introspect(con: Gio.DBusConnection, path: str = names.OBJECT_PATH) -> str:
    """The live introspection XML of an object of the daemon."""
    reply = con.call_sync(
        names.BUS_NAME,
        path,
        names.DBUS_INTROSPECTABLE,
        "Introspect",
        None,
        GLib.VariantType("(s)"),
        Gio.DBusCallFlags.NONE,
        10_000,
        None,
    )
    xml: str = reply.unpack()[0]
    return xml


def start_chat(con: Gio.DBusConnection, content: str = "Write a long story") -> str:
    """Start a short streaming chat; its request object's path."""
    messages = [{"role": GLib.Variant("s", "user"), "content": GLib.Variant("s", content)}]
    reply = con.call_sync(
        names.BUS_NAME,
        names.OBJECT_PATH,
        names.FAMILY_INTERFACES["llm"],
        "StartChat",
        GLib.Variant("(aa{sv}a{sv})", (messages, {"max_tokens": GLib.Variant("x", 4)})),
        GLib.VariantType("(o)"),
        Gio.DBusCallFlags.NONE,
        30_000,
        None,
    )
    path: str = reply.unpack()[0]
    return path

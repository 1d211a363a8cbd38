"""A blocking D-Bus client for aiosd (pydbus), with the same surface as :class:`aiosd.sdk.Client`.

``call`` and ``stream`` take a syscall name and JSON-like params, exactly as on the socket;
the mapping to bus methods comes from the same syscall table the daemon uses.  Streams run
the GLib main loop of the calling thread until the request object reports how it ended.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import pydbus
from gi.repository import Gio, GLib

from aiosd.api.dbus import names
from aiosd.api.dbus.codec import arg_to_bus, field_codecs, params_error, result_from_bus
from aiosd.api.dbus.introspection import TRANSPORT_FIELDS, BusMethod, bus_methods
from aiosd.api.dbus.variants import Refused, free_vardict
from aiosd.errors import (
    DBUS_ERROR_PREFIX,
    AiosError,
    InvalidParams,
    MethodNotFound,
    PermissionDenied,
    error_for_dbus_name,
)
from aiosd.sdk.client import DaemonUnreachable

_HINT = "set DBUS_SYSTEM_BUS_ADDRESS to the bus it uses"
#: The daemon is not there.  Not NoReply: a call that got no answer reached a daemon that
#: may still be working on it.
_UNREACHABLE = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.Disconnected",
}
#: The D-Bus specification's errors the daemon (or GDBus for it) answers with, as the error
#: classes the socket would give.
_STANDARD: dict[str, type[AiosError]] = {
    names.DBUS_INVALID_ARGS: InvalidParams,
    names.DBUS_ACCESS_DENIED: PermissionDenied,
    names.DBUS_UNKNOWN_METHOD: MethodNotFound,
    names.DBUS_UNKNOWN_INTERFACE: MethodNotFound,
    names.DBUS_UNKNOWN_PROPERTY: MethodNotFound,
}
#: How long a call may take: as long as it needs (GDBus's default of 25 s would cut a long
#: chat short); the daemon's own limits end what must end.
_NO_TIMEOUT = GLib.MAXINT


system_bus_address = names.system_bus_address


def _remote(exc: GLib.Error) -> tuple[str, str]:
    """A remote error's D-Bus name ("" if it is GDBus's own) and the message it was sent with."""
    name = Gio.DBusError.get_remote_error(exc) or ""
    # Gio.DBusError.strip_remote_error changes a copy, not PyGObject's exception.
    return name, str(exc.message).removeprefix(f"GDBus.Error:{name}: ")


def _error(exc: GLib.Error) -> Exception:
    name, message = _remote(exc)
    if name in _UNREACHABLE:
        return _Unreachable(message)
    if name.startswith(DBUS_ERROR_PREFIX):
        return error_for_dbus_name(name, message)
    standard = _STANDARD.get(name)
    if standard is not None:
        return standard(message)
    return AiosError(f"{name or 'D-Bus error'}: {message}")


class _Unreachable(Exception):
    pass


@functools.cache
def _methods_by_syscall() -> Mapping[str, Mapping[bool, BusMethod]]:
    """syscall name → {starts_request: its bus method} (built once; only read)."""
    methods: dict[str, dict[bool, BusMethod]] = {}
    for bm in bus_methods().values():
        methods.setdefault(bm.syscall.name, {})[bm.starts_request] = bm
    return methods


class BusClient:
    """aiosd over D-Bus, one call at a time."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address or system_bus_address()
        self._bus: Any = None
        self._methods = _methods_by_syscall()
        self.last_result: Any = None

    def connect(self) -> BusClient:
        """Open the connection to the bus."""
        try:
            self._bus = pydbus.connect(self.address)
        except GLib.Error as exc:
            raise DaemonUnreachable(self._where(), exc.message, _HINT) from None
        return self

    def __enter__(self) -> BusClient:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        if self._bus is not None:
            self._bus.con.close_sync(None)
            self._bus = None

    def _args(self, bm: BusMethod, params: dict[str, Any]) -> GLib.Variant:
        params = {k: v for k, v in params.items() if k not in TRANSPORT_FIELDS}
        fields = field_codecs(bm.syscall.params)
        values: list[object] = []
        for name, _sig in bm.args:
            value = params.pop(name, None)
            if value is None:
                # A typed argument cannot be left out: say so as the daemon would.
                raise InvalidParams(
                    f"invalid params: {name}: Field required",
                    data={"errors": [{"field": name, "message": "Field required"}]},
                )
            values.append(arg_to_bus(name, fields[name], value))
        if bm.has_options:
            # Typed from their values: the daemon reads them as declared and validates them.
            try:
                values.append(free_vardict(params))
            except Refused as exc:
                raise params_error(exc) from None
        return GLib.Variant(f"({bm.in_signature})", tuple(values))

    def _invoke(self, bm: BusMethod, params: dict[str, Any]) -> GLib.Variant:
        if self._bus is None:
            self.connect()
        try:
            reply = self._bus.con.call_sync(
                names.BUS_NAME,
                names.OBJECT_PATH,
                bm.interface,
                bm.name,
                self._args(bm, params),
                GLib.VariantType.new(f"({bm.out_signature})"),
                Gio.DBusCallFlags.NONE,
                _NO_TIMEOUT,
                None,
            )
        except GLib.Error as exc:
            err = _error(exc)
            if isinstance(err, _Unreachable):
                raise DaemonUnreachable(self._where(), str(err), _HINT) from None
            raise err from None
        return reply.get_child_value(0)

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Make one syscall and return its result."""
        bm = self._method(method, False)
        self.last_result = result_from_bus(bm.syscall.result, self._invoke(bm, dict(params or {})))
        return self.last_result

    def stream(self, method: str, params: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
        """Start a streaming syscall; yield ``{"seq", "content"}`` per Token signal.

        The result is left in ``last_result``; a Failed signal raises its AiosError.
        """
        if self._bus is None:
            self.connect()
        events: collections.deque[tuple[str, str, GLib.Variant]] = collections.deque()

        def on_signal(
            con: Any,
            sender: str,
            path: str,
            iface: str,
            signal: str,
            args: GLib.Variant,
            _data: Any,
        ) -> None:
            events.append((path, signal, args))

        con = self._bus.con
        owner = self._owner()
        gone: list[str] = []

        def on_owner(
            con: Any,
            sender: str,
            path: str,
            iface: str,
            signal: str,
            args: GLib.Variant,
            _data: Any,
        ) -> None:
            _name, old, _new = args.unpack()
            if old == owner:
                gone.append("the daemon left the bus")

        # Subscribed before the request exists, so not even its first token can be missed;
        # on the daemon's unique name, which stays valid while it drains after a stop.
        subs = [
            con.signal_subscribe(
                owner,
                names.REQUEST_INTERFACE,
                None,
                None,
                None,
                Gio.DBusSignalFlags.NONE,
                on_signal,
                None,
            ),
            con.signal_subscribe(
                "org.freedesktop.DBus",
                "org.freedesktop.DBus",
                "NameOwnerChanged",
                "/org/freedesktop/DBus",
                names.BUS_NAME,
                Gio.DBusSignalFlags.NONE,
                on_owner,
                None,
            ),
        ]
        closed = con.connect("closed", lambda *_: gone.append("the bus connection closed"))
        path: str | None = None
        finished = False
        try:
            bm = self._method(method, True)
            path = str(self._invoke(bm, dict(params or {})).get_string())
            ctx = GLib.MainContext.ref_thread_default()
            while True:
                while events:
                    where, signal, args = events.popleft()
                    if where != path:
                        continue
                    if signal == "Token":
                        seq, content = args.unpack()
                        yield {"seq": seq, "content": content}
                    elif signal == "Finished":
                        finished = True
                        self.last_result = result_from_bus(
                            bm.syscall.result, args.get_child_value(0)
                        )
                        return
                    elif signal == "Failed":
                        finished = True
                        name, message = args.unpack()
                        raise error_for_dbus_name(name, message)
                if gone:
                    raise DaemonUnreachable(self._where(), gone[0], _HINT)
                ctx.iteration(True)
        finally:
            for sub in subs:
                con.signal_unsubscribe(sub)
            con.disconnect(closed)
            if path is not None and not finished and not gone:
                # Abandoned by the caller: stop the work rather than leave it running.
                try:
                    con.call_sync(
                        owner,
                        path,
                        names.REQUEST_INTERFACE,
                        "Cancel",
                        None,
                        None,
                        Gio.DBusCallFlags.NONE,
                        5000,
                        None,
                    )
                except GLib.Error:
                    pass

    def _owner(self) -> str:
        try:
            reply = self._bus.con.call_sync(
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "GetNameOwner",
                GLib.Variant("(s)", (names.BUS_NAME,)),
                GLib.VariantType.new("(s)"),
                Gio.DBusCallFlags.NONE,
                -1,
                None,
            )
        except GLib.Error as exc:
            raise DaemonUnreachable(self._where(), _remote(exc)[1], _HINT) from None
        return str(reply.unpack()[0])

    def _where(self) -> str:
        return f"{names.BUS_NAME} on the bus {self.address}"

    def _method(self, syscall: str, start: bool) -> BusMethod:
        try:
            return self._methods[syscall][start]
        except KeyError:
            raise AiosError(
                f"{syscall} has no {'streaming ' if start else ''}D-Bus method"
            ) from None

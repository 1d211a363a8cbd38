"""The D-Bus SDK's side of a call: how long it may take, and which error a name becomes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from gi.repository import Gio, GLib

from aiosd.api.dbus import names
from aiosd.errors import (
    DBUS_ERROR_PREFIX,
    AiosError,
    Busy,
    InvalidParams,
    MethodNotFound,
    PermissionDenied,
)
from aiosd.sdk.client import DaemonUnreachable
from aiosd.sdk.dbus import BusClient, _error


def _remote(name: str, message: str = "what the daemon said") -> GLib.Error:
    return Gio.DBusError.new_for_dbus_error(name, message)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        (names.DBUS_INVALID_ARGS, InvalidParams),
        (names.DBUS_ACCESS_DENIED, PermissionDenied),
        (names.DBUS_UNKNOWN_METHOD, MethodNotFound),
        (names.DBUS_UNKNOWN_INTERFACE, MethodNotFound),
        (names.DBUS_UNKNOWN_PROPERTY, MethodNotFound),
        (Busy.dbus_name, Busy),
    ],
)
def test_standard_error_names_become_the_classes_the_socket_gives(
    name: str, cls: type[AiosError]
) -> None:
    err = _error(_remote(name))
    assert type(err) is cls and err.message == "what the daemon said"


def test_an_unknown_daemon_error_keeps_its_name() -> None:
    err = _error(_remote(DBUS_ERROR_PREFIX + "FromTheFuture"))
    assert type(err) is AiosError
    assert err.message == f"{DBUS_ERROR_PREFIX}FromTheFuture: what the daemon said"


class _Con:
    """Answers every call with ``answer`` (a reply, or an error to raise); records timeouts."""

    def __init__(self, answer: GLib.Variant | GLib.Error) -> None:
        self.answer = answer
        self.timeouts: list[int] = []

    def call_sync(self, *args: object) -> GLib.Variant:
        timeout = args[7]
        assert isinstance(timeout, int)
        self.timeouts.append(timeout)
        if isinstance(self.answer, GLib.Error):
            raise self.answer
        return self.answer


def _client(con: _Con) -> BusClient:
    client = BusClient("unix:path=/nonexistent")
    client._bus = SimpleNamespace(con=con)
    return client


def test_a_call_waits_as_long_as_the_daemon_works_on_it() -> None:
    con = _Con(GLib.Variant("(a{sv})", ({"state": GLib.Variant("s", "running")},)))
    assert _client(con).call("system.status")["state"] == "running"
    assert con.timeouts == [GLib.MAXINT]  # not -1: GDBus's default of 25 s


def test_no_reply_is_not_an_unreachable_daemon() -> None:
    con = _Con(_remote("org.freedesktop.DBus.Error.NoReply", "no reply"))
    with pytest.raises(AiosError, match="NoReply: no reply") as exc:
        _client(con).call("system.status")
    assert not isinstance(exc.value, DaemonUnreachable)
    gone = _Con(_remote("org.freedesktop.DBus.Error.ServiceUnknown", "not activatable"))
    with pytest.raises(DaemonUnreachable):
        _client(gone).call("system.status")

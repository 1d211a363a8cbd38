"""The front-end's parts without a bus: request objects, Properties, the caller's identity."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import pytest
from gi.repository import GLib

from aiosd.api.dbus import names, properties, service
from aiosd.api.dbus.requests import RequestObject
from aiosd.api.dbus.service import NO_GID, _caller_from
from aiosd.config import AccessConfig
from aiosd.errors import InternalError, NotSupported
from aiosd.kernel.syscall_base import NoParams, Result, Syscall
from aiosd.managers.access import AccessManager, Permission, Role
from aiosd.managers.users import ProcessIds

# --- request objects -------------------------------------------------------------------------


class _Said(Result):
    said: list[str]


def _never(family: object, p: NoParams, c: object, emit: object) -> _Said:
    raise AssertionError("the request tests drive the work themselves")


SPEC = Syscall("demo.say", NoParams, _Said, Permission.user, _never, "Say.", object)


class _Con:
    """Records what a request object emits; registrations always succeed."""

    def __init__(self) -> None:
        self.signals: list[tuple[str, Any]] = []

    def register_object(self, *args: object) -> int:
        return 1

    def unregister_object(self, registration: int) -> bool:
        return True

    def emit_signal(
        self, dest: str, path: str, iface: str, signal: str, args: GLib.Variant
    ) -> None:
        self.signals.append((signal, args.unpack()))


def _request(con: _Con, forgotten: list[RequestObject]) -> RequestObject:
    path = f"{names.REQUEST_PATH_PREFIX}/1"
    return RequestObject(forgotten.append, con, path, ":1.9", SPEC)


def _ended(result: dict[str, Any]) -> list[tuple[str, Any]]:
    """The signals of a request whose work returns ``result``, from its end on."""
    con = _Con()
    forgotten: list[RequestObject] = []
    req = _request(con, forgotten)

    async def work() -> dict[str, Any]:
        return result

    asyncio.run(req.run(work()))
    assert forgotten == [req]  # gone from the front-end's table too
    return con.signals


def _state(signals: list[tuple[str, Any]]) -> list[str]:
    return [args[1]["State"] for signal, args in signals if signal == "PropertiesChanged"]


def test_a_request_that_finishes_says_so_with_its_result() -> None:
    signals = _ended({"said": ["hi"]})
    assert _state(signals) == ["finished"]
    assert [s for s, _ in signals] == ["PropertiesChanged", "Finished", "InterfacesRemoved"]
    assert signals[1][1] == ({"said": ["hi"]},)


def test_a_result_that_cannot_be_sent_ends_as_failed_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="aiosd.api.dbus.requests"):
        signals = _ended({"said": [1]})  # not the declared list[str]: the daemon's fault
    assert _state(signals) == ["failed"]
    assert [s for s, _ in signals] == ["PropertiesChanged", "Failed", "InterfacesRemoved"]
    assert signals[1][1] == (InternalError.dbus_name, "internal error")
    (record,) = caplog.records
    assert "demo.say" in record.getMessage() and record.exc_info is not None


def test_a_result_holding_nul_fails_as_not_supported_naming_the_member() -> None:
    signals = _ended({"said": ["a\x00b"]})
    assert _state(signals) == ["failed"]
    name, message = next(args for s, args in signals if s == "Failed")
    assert name == NotSupported.dbus_name and "said.0" in message


def test_a_token_holding_nul_fails_the_generation_rather_than_being_cut() -> None:
    con = _Con()
    req = _request(con, [])
    with pytest.raises(NotSupported, match="token contains NUL"):
        asyncio.run(req.emit_token({"seq": 0, "content": "a\x00b"}))
    assert not [s for s, _ in con.signals if s == "Token"]


# --- Properties -------------------------------------------------------------------------------


class _Invocation:
    """Records how a call was answered."""

    def __init__(self) -> None:
        self.value: Any = None
        self.error: str | None = None

    def return_value(self, value: GLib.Variant) -> None:
        self.value = value.unpack()

    def return_dbus_error(self, name: str, message: str) -> None:
        self.error = name

    def get_object_path(self) -> str:
        return names.OBJECT_PATH


INTERFACES = {
    "org.example.A": {"Colour": GLib.Variant("s", "red"), "Size": GLib.Variant("x", 1)},
    "org.example.B": {"Size": GLib.Variant("x", 2), "Shape": GLib.Variant("s", "round")},
}


def _answer(method: str, *args: str) -> _Invocation:
    inv = _Invocation()
    params = GLib.Variant("(" + "s" * len(args) + ")", args)
    if method == "Set":
        params = GLib.Variant("(ssv)", (*args, GLib.Variant("s", "x")))
    properties.answer(inv, method, params, INTERFACES)
    return inv


def test_an_empty_interface_name_stands_for_every_interface() -> None:
    assert _answer("Get", "", "Shape").value == ("round",)
    assert _answer("Get", "", "Size").value == (1,)  # the first interface that has it
    assert _answer("GetAll", "").value == ({"Colour": "red", "Size": 1, "Shape": "round"},)
    assert _answer("Get", "", "Weight").error == names.DBUS_UNKNOWN_PROPERTY
    assert _answer("Set", "", "Colour").error == names.DBUS_PROPERTY_READ_ONLY
    # A named interface is still only that one.
    assert _answer("Get", "org.example.A", "Shape").error == names.DBUS_UNKNOWN_PROPERTY
    assert _answer("GetAll", "org.example.C").error == names.DBUS_UNKNOWN_INTERFACE


# --- the caller's identity --------------------------------------------------------------------


def _no_agents(pid: int, uid: int) -> str | None:
    return None


def _creds(uid: int, pid: int, groups: list[int]) -> dict[str, Any]:
    return {"UnixUserID": uid, "ProcessID": pid, "UnixGroupIDs": groups}


@pytest.fixture
def proc(monkeypatch: pytest.MonkeyPatch) -> dict[int, ProcessIds]:
    """What /proc says of each pid (a pid it has no entry for is gone)."""
    table: dict[int, ProcessIds] = {}
    monkeypatch.setattr(
        service, "process_ids", lambda pid: table.get(pid, ProcessIds(None, frozenset()))
    )
    return table


def test_the_proc_gid_counts_only_while_the_pid_is_still_the_bus_uids(
    proc: dict[int, ProcessIds],
) -> None:
    proc[40] = ProcessIds(1234, frozenset(), (1000, 1000))
    assert _caller_from(_creds(1000, 40, [100, 1000]), ":1.4", _no_agents).gid == 1234
    # The pid now belongs to another user's process (reused), or runs setuid: not trusted.
    proc[41] = ProcessIds(0, frozenset({0}), (0, 0))
    proc[42] = ProcessIds(0, frozenset(), (1000, 0))
    for pid in (41, 42, 43):  # 43: gone
        caller = _caller_from(_creds(1000, pid, [1000, 100]), ":1.4", _no_agents)
        assert caller.gid == 100 and caller.groups == {100, 1000}, pid


def test_no_gid_at_all_is_a_gid_that_matches_nothing(proc: dict[int, ProcessIds]) -> None:
    caller = _caller_from(_creds(1000, 43, []), ":1.4", _no_agents)
    assert caller.gid == NO_GID != 1000  # never the uid taken for a gid
    assert not any(caller.in_group(g) for g in (0, 1000, 65534))
    access = AccessManager(AccessConfig())
    access.configure(AccessConfig(), admin_gid=1000, user_gid=0)
    assert access.role(caller) is Role.none


def test_the_callers_own_process_gives_its_gid_from_proc() -> None:
    mine = _caller_from(_creds(os.getuid(), os.getpid(), [os.getegid() + 1]), ":1.4", _no_agents)
    assert mine.gid == os.getegid() and mine.pid == os.getpid()
    assert mine.session == "bus-1.4"
    # The same pid, said to be another uid's by the bus: /proc disagrees, its gid is not used.
    other = _caller_from(
        _creds(os.getuid() + 1, os.getpid(), [os.getegid() + 1]), ":1.4", _no_agents
    )
    assert other.gid == os.getegid() + 1

"""The error tree maps classes to codes and D-Bus names one-to-one, and says so at definition."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from aiosd import errors
from aiosd.errors import DBUS_ERROR_PREFIX, AiosError, Busy, error_for_code, error_for_dbus_name


def _tree() -> list[type[AiosError]]:
    out: list[type[AiosError]] = [AiosError]
    todo = list(AiosError.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out


@pytest.fixture(autouse=True)
def _no_refused_classes_left() -> Iterator[None]:
    """Refused classes still sit in ``__subclasses__()`` until collected: collect them, so
    that other tests walking the tree (the docs test) never see them."""
    yield
    gc.collect()


def test_every_class_has_its_own_code_and_dbus_name() -> None:
    tree = _tree()
    assert len({c.rpc_code for c in tree}) == len(tree)
    assert len({c.dbus_name for c in tree}) == len(tree)
    for cls in tree:
        assert cls.dbus_name.startswith(DBUS_ERROR_PREFIX), cls


@pytest.mark.parametrize("cls", _tree(), ids=lambda c: c.__name__)
def test_both_maps_lead_back_to_the_class(cls: type[AiosError]) -> None:
    by_code = error_for_code(cls.rpc_code, "m", {"k": 1})
    by_name = error_for_dbus_name(cls.dbus_name, "m")
    assert type(by_code) is cls and by_code.data == {"k": 1} and by_code.message == "m"
    assert type(by_name) is cls and by_name.message == "m"


def test_the_three_limits_have_names_of_their_own() -> None:
    names = {errors.FrameTooLarge.dbus_name, errors.TooManyRequests.dbus_name}
    names.add(errors.TooManyConnections.dbus_name)
    assert len(names) == 3
    assert DBUS_ERROR_PREFIX + "LimitsExceeded" not in names


def test_unknown_codes_and_names_become_the_root() -> None:
    assert type(error_for_code(-31999, "m")) is AiosError
    assert type(error_for_dbus_name(DBUS_ERROR_PREFIX + "NoSuchThing", "m")) is AiosError


def test_a_duplicate_dbus_name_is_refused_at_definition() -> None:
    with pytest.raises(TypeError, match="dbus_name .*Busy'.* is already Busy's"):

        class AlsoBusy(AiosError):
            rpc_code = -32090
            dbus_name = Busy.dbus_name

    # Refused means not registered: the code it asked for is still free.
    assert type(error_for_code(-32090, "m")) is AiosError
    assert type(error_for_dbus_name(Busy.dbus_name, "m")) is Busy


def test_a_duplicate_code_is_refused_at_definition() -> None:
    with pytest.raises(TypeError, match="rpc_code -32002 is already Busy's"):

        class Crowded(AiosError):
            rpc_code = Busy.rpc_code
            dbus_name = DBUS_ERROR_PREFIX + "Crowded"

    assert type(error_for_dbus_name(DBUS_ERROR_PREFIX + "Crowded", "m")) is AiosError
    assert type(error_for_code(Busy.rpc_code, "m")) is Busy


def test_a_subclass_must_state_its_own_code_and_name() -> None:
    with pytest.raises(TypeError, match="VeryBusy: rpc_code .* and dbus_name"):

        class VeryBusy(Busy):
            """Inherits Busy's code and name: a client could not tell the two apart."""


@pytest.mark.parametrize(
    "name", ["org.example.Error.Other", DBUS_ERROR_PREFIX, DBUS_ERROR_PREFIX + "Two.Parts"]
)
def test_a_dbus_name_outside_the_tree_is_refused(name: str) -> None:
    with pytest.raises(TypeError, match="is not org.aiosd.Daemon1.Error.<Name>"):

        class Stray(AiosError):
            rpc_code = -32091
            dbus_name = name

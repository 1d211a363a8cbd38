"""The error tree maps classes to codes and D-Bus names one-to-one, and says so at definition."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from aiosd import errors
from aiosd.errors import DBUS_ERROR_PREFIX, AiosError, Busy, error_for_code, error_for_dbus_name


def _tree() -> list[type[AiosError]]:
    """Every class that states a code and a D-Bus name (refinements state neither)."""
    out: list[type[AiosError]] = [AiosError]
    todo = list(AiosError.__subclasses__())
    while todo:
        cls = todo.pop()
        if "rpc_code" in cls.__dict__:
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
    unknown = error_for_dbus_name(DBUS_ERROR_PREFIX + "NoSuchThing", "m")
    assert type(unknown) is AiosError
    assert unknown.message == f"{DBUS_ERROR_PREFIX}NoSuchThing: m"  # the name is not lost


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


def test_a_refinement_reaches_clients_as_its_parent() -> None:
    class OllamaTimeout(errors.BackendUnavailable):
        """States neither a code nor a name: a finer kind inside the daemon only."""

    err = OllamaTimeout("slow")
    assert isinstance(err, errors.BackendUnavailable)
    assert err.to_rpc()["code"] == errors.BackendUnavailable.rpc_code
    assert err.dbus_name == errors.BackendUnavailable.dbus_name
    # Both maps still lead to the parent: a client rebuilds the class that stated them.
    assert type(error_for_code(err.rpc_code, "m")) is errors.BackendUnavailable
    assert type(error_for_dbus_name(err.dbus_name, "m")) is errors.BackendUnavailable


def test_a_subclass_that_states_only_a_name_is_refused() -> None:
    with pytest.raises(TypeError, match="HalfBusy: rpc_code -32002 is already Busy's"):

        class HalfBusy(Busy):
            """A name of its own but Busy's code: the code would lead to two classes."""

            dbus_name = DBUS_ERROR_PREFIX + "HalfBusy"

    assert type(error_for_dbus_name(DBUS_ERROR_PREFIX + "HalfBusy", "m")) is AiosError


@pytest.mark.parametrize(
    "name", ["org.example.Error.Other", DBUS_ERROR_PREFIX, DBUS_ERROR_PREFIX + "Two.Parts"]
)
def test_a_dbus_name_outside_the_tree_is_refused(name: str) -> None:
    with pytest.raises(TypeError, match="is not org.aiosd.Daemon1.Error.<Name>"):

        class Stray(AiosError):
            rpc_code = -32091
            dbus_name = name

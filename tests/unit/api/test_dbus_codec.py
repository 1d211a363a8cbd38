"""Values cross the bus as declared or not at all: never converted, never cut, never retyped.

Both directions: what the SDK sends (typed arguments checked before GLib sees them), what the
daemon reads (free-form data is JSON; bytes only where the model says binary) and what the
daemon sends (text GLib would cut at a NUL is refused, naming the member).
"""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from gi.repository import GLib

from aiosd.api.dbus import codec
from aiosd.api.dbus.variants import bytes_variant
from aiosd.errors import InvalidParams, NotSupported
from aiosd.kernel.families.storage import GetResult, PutParams
from aiosd.kernel.syscall_base import BusBinary, Result
from aiosd.sdk.dbus import BusClient

PUT_REQUIRED = ["collection", "key", "value"]


def _args(syscall: str, params: dict[str, Any]) -> GLib.Variant:
    """The arguments the SDK would send (no bus needed: they are built before the call)."""
    client = BusClient("unix:path=/nonexistent")
    return client._args(client._method(syscall, False), params)


def _field_of(exc: pytest.ExceptionInfo[InvalidParams]) -> str:
    (error,) = exc.value.data["errors"]
    return str(error["field"])


# --- the SDK's typed arguments ---------------------------------------------------------------


@pytest.mark.parametrize("value", [1.9, True, "5", 2**63, [1]], ids=repr)
def test_a_wrong_typed_argument_is_refused_naming_it_not_converted(value: object) -> None:
    with pytest.raises(InvalidParams, match=r"invalid params: id: ") as exc:
        _args("memory.delete", {"id": value})
    assert _field_of(exc) == "id"


def test_a_wrong_member_of_a_typed_argument_is_named_by_its_path() -> None:
    with pytest.raises(InvalidParams) as exc:
        _args("llm.chat", {"messages": [{"role": "user", "content": "hi"}, {"role": 5}]})
    assert _field_of(exc) == "messages.1.role"
    with pytest.raises(InvalidParams) as exc:
        _args("llm.chat", {"messages": [{"role": "user", "colour": "red"}]})
    assert _field_of(exc) == "messages.0.colour"
    with pytest.raises(InvalidParams) as exc:
        _args("llm.chat", {"messages": "hi"})
    assert _field_of(exc) == "messages"


def test_an_option_that_is_not_json_is_refused_naming_it() -> None:
    with pytest.raises(InvalidParams) as exc:
        _args("memory.add", {"content": "c", "tags": {"a"}})
    assert _field_of(exc) == "tags"


def test_typed_arguments_of_the_declared_types_go_as_declared() -> None:
    sent = _args("memory.delete", {"id": 7, "space": "s"})
    assert sent.get_type_string() == "(xa{sv})" and sent.unpack() == (7, {"space": "s"})
    # A message leaves out what has a default (content), as the socket allows.
    chat = _args("llm.chat", {"messages": [{"role": "assistant"}]})
    assert chat.unpack()[0] == [{"role": "assistant"}]


# --- text holding NUL: refused, never cut ----------------------------------------------------


def _get_result(**over: Any) -> dict[str, Any]:
    base = {
        "collection": "c",
        "key": "k",
        "version": 1,
        "value": "text",
        "encoding": "text",
        "metadata": {},
        "size": 4,
        "created": 0.0,
    }
    return GetResult.model_validate({**base, **over}).model_dump(mode="json")


@pytest.mark.parametrize(
    ("over", "where"),
    [
        ({"value": "a\x00b"}, "value"),
        ({"metadata": {"note": ["ok", "x\x00"]}}, "metadata.note.1"),
        ({"metadata": {"k\x00": 1}}, r"metadata\.k\\x00"),  # the NUL written out
        ({"key": "k\x00"}, "key"),
    ],
)
def test_a_result_holding_nul_is_refused_naming_the_member(
    over: dict[str, Any], where: str
) -> None:
    with pytest.raises(NotSupported, match=rf"result member {where}: text contains NUL") as exc:
        codec.result_vardict(GetResult, _get_result(**over))
    assert "\x00" not in exc.value.message  # a D-Bus error message would end there


def test_bytes_holding_nul_are_bytes_not_text() -> None:
    sent = codec.result_vardict(GetResult, _get_result(value="AP8A", encoding="base64"))
    assert (
        sent["value"].get_type_string() == "ay"
        and sent["value"].get_data_as_bytes().get_data() == b"\x00\xff\x00"
    )


def test_the_sdk_refuses_to_send_text_holding_nul() -> None:
    with pytest.raises(NotSupported, match="value: text contains NUL.*as bytes"):
        _args("storage.put", {"collection": "c", "key": "k", "value": "a\x00b"})
    with pytest.raises(NotSupported, match="note: text contains NUL"):
        _args("storage.put", {"collection": "c", "key": "k", "value": "v", "note": "\x00"})
    as_bytes = _args("storage.put", {"collection": "c", "key": "k", "value": b"a\x00b"})
    assert as_bytes.get_child_value(2).get_variant().get_type_string() == "ay"


# --- what the daemon reads -------------------------------------------------------------------


def _put(value: GLib.Variant, options: dict[str, GLib.Variant]) -> dict[str, object]:
    args = GLib.Variant("(ssva{sv})", ("c", "k", value, options))
    call, _keys = codec.params_from_bus(PutParams, args, PUT_REQUIRED, True)
    return call


def test_bytes_inside_free_form_data_are_refused_naming_the_member() -> None:
    blob = GLib.Variant("a{sv}", {"blob": bytes_variant(b"\x01\x02")})
    with pytest.raises(InvalidParams, match="metadata.blob: bytes") as exc:
        _put(GLib.Variant("s", "v"), {"metadata": blob})
    assert _field_of(exc) == "metadata.blob"
    nested = GLib.Variant("a{sv}", {"l": GLib.Variant("av", [bytes_variant(b""), blob])})
    with pytest.raises(InvalidParams) as exc:
        _put(GLib.Variant("s", "v"), {"metadata": nested})
    assert _field_of(exc) == "metadata.l.1.blob"


def test_free_form_data_reads_back_as_json() -> None:
    meta = GLib.Variant(
        "a{sv}", {"l": GLib.Variant("av", [bytes_variant(b""), GLib.Variant("x", 1)])}
    )
    call = _put(GLib.Variant("s", "v"), {"metadata": meta})
    assert call["metadata"] == {"l": [None, 1]}  # an empty ay is a null element
    PutParams.model_validate(call)


def test_bytes_said_to_be_text_are_refused() -> None:
    raw = bytes_variant(b"\x00\xff")
    with pytest.raises(InvalidParams, match="value: bytes .*'text'") as exc:
        _put(raw, {"encoding": GLib.Variant("s", "text")})
    assert _field_of(exc) == "value"
    assert _put(raw, {}) == {"collection": "c", "key": "k", "value": "AP8=", "encoding": "base64"}
    assert _put(raw, {"encoding": GLib.Variant("s", "base64")})["value"] == "AP8="


# --- BusBinary, however declared --------------------------------------------------------------


class _MaybeBlob(Result):
    blob: Annotated[str, BusBinary()] | None = None
    encoding: str = "text"


def test_an_optional_binary_field_is_binary() -> None:
    assert codec.field_codecs(_MaybeBlob)["blob"].binary
    sent = codec.result_vardict(_MaybeBlob, {"blob": "AP8=", "encoding": "base64"})
    assert sent["blob"].get_type_string() == "ay"
    back = codec.result_from_bus(_MaybeBlob, GLib.Variant("a{sv}", sent))
    assert back == {"blob": "AP8=", "encoding": "base64"}
    assert "blob" not in codec.result_vardict(_MaybeBlob, {"blob": None, "encoding": "text"})


def test_a_binary_field_without_an_encoding_field_is_refused_at_build() -> None:
    class NoEncoding(Result):
        blob: Annotated[str, BusBinary()]

    with pytest.raises(TypeError, match="NoEncoding: binary field blob needs an encoding"):
        codec.signatures(NoEncoding)

    class Listed(Result):
        blobs: list[Annotated[str, BusBinary()]]
        encoding: str

    with pytest.raises(TypeError, match="Listed: .*BusBinary marks a model's own fields"):
        codec.signatures(Listed)


@pytest.mark.parametrize("annotation", [tuple[int, ...], set[str], frozenset[int]], ids=str)
def test_only_lists_are_arrays(annotation: object) -> None:
    with pytest.raises(TypeError, match="no D-Bus type"):
        codec.codec_for(annotation)

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


# --- what the bus would refuse: refused before it is sent ------------------------------------


def _nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_a_result_nested_deeper_than_a_message_may_be_is_refused_naming_the_member() -> None:
    # Each level of an object is three on the bus (array, entry, variant): 20 fit in 64.
    sent = codec.result_vardict(GetResult, _get_result(metadata=_nested(20)))
    assert "metadata" in sent
    with pytest.raises(NotSupported, match="nested deeper than a D-Bus message") as exc:
        codec.result_vardict(GetResult, _get_result(metadata=_nested(21)))
    assert "result member metadata" + ".a" * 20 + ":" in exc.value.message  # the 21st
    # Lists are two (array, variant): as deep a list is refused the same way.
    deep_list: list[Any] = [1]
    for _ in range(40):
        deep_list = [deep_list]
    with pytest.raises(NotSupported, match=r"metadata\.l\.0\.0.*nested deeper"):
        codec.result_vardict(GetResult, _get_result(metadata={"l": deep_list}))


@pytest.mark.parametrize(
    ("metadata", "where"),
    [
        ({"n": 2**63}, "metadata.n: integer 9223372036854775808 is beyond int64"),
        ({"n": -(2**63) - 1}, "metadata.n: integer -9223372036854775809 is beyond int64"),
        ({"l": [1, 10**5000]}, "metadata.l.1: integer of 16610 bits is beyond int64"),
    ],
)
def test_a_result_integer_beyond_its_bus_type_is_refused_naming_the_member(
    metadata: dict[str, Any], where: str
) -> None:
    with pytest.raises(NotSupported, match=f"result member {where}"):
        codec.result_vardict(GetResult, _get_result(metadata=metadata))
    with pytest.raises(NotSupported, match="result member size: integer .* beyond int64"):
        codec.result_vardict(GetResult, {**_get_result(), "size": 2**64})


def test_a_result_holding_a_lone_surrogate_is_refused_naming_the_member() -> None:
    with pytest.raises(NotSupported, match=r"result member metadata\.s: .*lone surrogate"):
        codec.result_vardict(GetResult, _get_result(metadata={"s": "a\udc80"}))


def test_a_result_larger_than_a_message_may_be_is_refused() -> None:
    big = _get_result(value="x" * 200_000)
    assert codec.result_body(GetResult, big, 256 * 1024).get_size() > 200_000
    with pytest.raises(NotSupported, match=r"is \d+ bytes on D-Bus.*dbus\.max_message_bytes"):
        codec.result_body(GetResult, big, 128 * 1024)


def test_the_size_of_a_large_message_is_measured_exactly() -> None:
    body = GLib.Variant("(a{sv})", ({"v": bytes_variant(b"\x01" * 1_000_000)},))
    # Under the limit by far: a bound will do (no second serialization).
    assert codec.message_bytes(body, 20_000_000) == body.get_size() * 16 + 64 * 1024
    exact = codec.message_bytes(body, 1_000_000)
    assert 1_000_000 < exact < 1_000_000 + 2048  # the bytes, a header, a little room


def test_the_sdk_still_refuses_out_of_range_integers_as_invalid_params() -> None:
    with pytest.raises(InvalidParams, match="metadata.n: integer .* beyond int64"):
        _args(
            "storage.put", {"collection": "c", "key": "k", "value": "v", "metadata": {"n": 2**64}}
        )


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


def test_an_error_message_is_always_one_dbus_string() -> None:
    from aiosd.api.dbus.variants import MAX_MESSAGE_CHARS, message_text

    text = message_text("no key 'a\x00b\udc80'" + "x" * 10_000)
    assert "\x00" not in text and "a\\x00b\\udc80" in text
    text.encode("utf-8")  # UTF-8, which a lone surrogate is not
    assert len(text) <= MAX_MESSAGE_CHARS + 16
    GLib.Variant("s", text)

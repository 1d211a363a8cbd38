"""Typed values on D-Bus: a field's type comes from its declaration, never from its value.

Every field of a syscall's model has one D-Bus signature, so a member has the same type in
every reply and every ``Finished`` signal, whether its list is empty or not:

==============================  ==============================================================
declared                        on the bus
==============================  ==============================================================
``bool`` ``int`` ``float``      ``b`` ``x`` ``d``
``str``, a str enum or Literal  ``s`` (an int enum or Literal: ``x``)
a model                         ``a{sv}``, its members typed by these rules
``list[T]``                     ``aT``
``list[T | None]``              ``aaT``: each element an array of no value (null) or one ``T``
``dict[str, T]``                ``a{sT}`` (members whose value is null are left out)
``dict[str, Any]``, ``Any``,    free-form: ``a{sv}`` or ``v``, typed from the value
a union of several types        (:mod:`aiosd.api.dbus.variants`)
``BusBinary`` text              ``v`` holding ``s`` (text) or ``ay`` (bytes)
==============================  ==============================================================

A model member that is None (declared ``T | None``) is left out of its ``a{sv}``: D-Bus has no
null, and a member the model declares can only be missing because it is null.

Encoding never converts: a value not of the declared type, or one GLib would change (text
holding NUL, an integer beyond ``x``), is refused with a :class:`Refused` naming its member.
Nor does it make a message the bus would refuse (and drop the daemon's connection for, with
every client's calls on it): encoding counts how deep each value sits in its message, and a
value nested deeper than D-Bus allows is refused the same way (:data:`variants.MAX_DEPTH`);
:func:`result_body` also measures the whole message against ``dbus.max_message_bytes``.
Going back (results in the SDK, parameters in the daemon), values are read from the variants
with the same codecs.  That side is lenient: a value of another shape than declared is passed
on as it is, for the models' validation to name; only what validation could not tell apart
(bytes where JSON is declared, bytes sent as ``encoding = "text"``) is refused there.
"""

from __future__ import annotations

import enum
import threading
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from gi.repository import Gio, GLib
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from aiosd.api.dbus import binary, names
from aiosd.api.dbus.variants import (
    INT64,
    Beyond,
    NotCarried,
    Refused,
    deeper,
    free_from_bus,
    free_variant,
    int_beyond,
    text,
)
from aiosd.errors import AiosError, InvalidParams, NotSupported
from aiosd.kernel.syscall_base import BusBinary


class Codec:
    """How values of one declared type travel: their signature, and the way there and back."""

    def __init__(self, signature: str) -> None:
        self.signature = signature

    def encode(self, value: object, depth: int = 0) -> object:
        """A JSON value in the form GLib takes for this signature; Refused if not as declared.

        ``depth`` is how deep the value sits in its message (a method's arguments are at 0);
        what would nest deeper than a message may is Beyond.
        """
        raise NotImplementedError

    def variant(self, value: object, depth: int = 0) -> GLib.Variant:
        """The value as the variant of an ``a{sv}`` member (the variant at ``depth``)."""
        return GLib.Variant(self.signature, self.encode(value, deeper(depth, 1)))

    def decode(self, value: GLib.Variant, fill_nulls: bool) -> object:
        """A variant of this signature back to JSON (``fill_nulls``: see :meth:`Struct.decode`)."""
        return value.unpack()

    def member(self, value: GLib.Variant, fill_nulls: bool) -> object:
        """The content of an ``a{sv}`` member back to JSON; a value of another type than
        declared (a client's choice) is read as free-form."""
        if value.get_type_string() != self.signature:
            return free_from_bus(value)
        return self.decode(value, fill_nulls)


class Scalar(Codec):
    """``b``, ``x``, ``d`` or ``s``."""

    def encode(self, value: object, depth: int = 0) -> object:
        """The value itself (a float for ``d``)."""
        sig = self.signature
        if isinstance(value, bool):
            if sig == "b":
                return value
        elif isinstance(value, int):
            if sig == "x":
                if INT64[0] <= value <= INT64[1]:
                    return value
                raise int_beyond(value, "int64 (x)")
            if sig == "d":
                if abs(value) < 2**1024:
                    return float(value)
                raise int_beyond(value, "a double (d)")
        elif isinstance(value, float):
            if sig == "d":
                return value
        elif isinstance(value, str) and sig == "s":
            return text(value)
        raise Refused(f"{type(value).__name__} {value!r:.40} where {sig} is declared")


class Held(Codec):
    """A ``v`` holding the type its value calls for: free-form, or binary."""

    def __init__(
        self,
        to_bus: Callable[[object, int], GLib.Variant],
        from_bus: Callable[[GLib.Variant], object],
    ) -> None:
        super().__init__("v")
        self._to_bus = to_bus
        self._from_bus = from_bus

    def encode(self, value: object, depth: int = 0) -> GLib.Variant:
        """The variant the value calls for (the variant at ``depth``, its content below)."""
        return self._to_bus(value, deeper(depth, 1))

    def variant(self, value: object, depth: int = 0) -> GLib.Variant:
        """The same variant: an ``a{sv}`` member is a ``v`` already."""
        return self._to_bus(value, deeper(depth, 1))

    def decode(self, value: GLib.Variant, fill_nulls: bool) -> object:
        """The value the ``v`` holds."""
        return self._from_bus(value.get_variant())

    def member(self, value: GLib.Variant, fill_nulls: bool) -> object:
        """A member is the held value itself."""
        return self._from_bus(value)


class Array(Codec):
    """``list[T]``: ``aT``."""

    def __init__(self, item: Codec) -> None:
        super().__init__("a" + item.signature)
        self.item = item

    def encode(self, value: object, depth: int = 0) -> list[object]:
        """Each element encoded as the item type."""
        if not isinstance(value, (list, tuple)):
            raise Refused(f"{type(value).__name__} where {self.signature} is declared")
        out = []
        inner = deeper(depth, 1) if value else depth
        for i, v in enumerate(value):
            try:
                out.append(self.item.encode(v, inner))
            except Refused as exc:
                raise exc.at(i) from None
        return out

    def decode(self, value: GLib.Variant, fill_nulls: bool) -> object:
        """Each element decoded as the item type."""
        out = []
        for i in range(value.n_children()):
            try:
                out.append(self.item.decode(value.get_child_value(i), fill_nulls))
            except Refused as exc:
                raise exc.at(i) from None
        return out


class Maybe(Codec):
    """An element declared ``T | None``: an array of no value (null) or one ``T``."""

    def __init__(self, item: Codec) -> None:
        super().__init__("a" + item.signature)
        self.item = item

    def encode(self, value: object, depth: int = 0) -> list[object]:
        """``[]`` for None, else ``[value]``."""
        return [] if value is None else [self.item.encode(value, deeper(depth, 1))]

    def decode(self, value: GLib.Variant, fill_nulls: bool) -> object:
        """None for ``[]``, else the one value."""
        if value.n_children() == 0:
            return None
        if value.n_children() > 1:  # not what was declared: let validation say so
            return free_from_bus(value)
        return self.item.decode(value.get_child_value(0), fill_nulls)


class Dict(Codec):
    """``dict[str, T]``: ``a{sT}``; members whose value is null are left out."""

    def __init__(self, value: Codec) -> None:
        super().__init__("a{s" + value.signature + "}")
        self.value = value

    def encode(self, value: object, depth: int = 0) -> dict[str, object]:
        """Each member's value encoded as the value type."""
        if not isinstance(value, Mapping):
            raise Refused(f"{type(value).__name__} where {self.signature} is declared")
        out: dict[str, object] = {}
        inner = 0
        for k, v in value.items():
            if v is None:
                continue
            inner = inner or deeper(depth, 2)  # the entries, then their members
            key = str(k)
            try:
                out[text(key)] = self.value.encode(v, inner)
            except Refused as exc:
                raise exc.at(key) from None
        return out

    def decode(self, value: GLib.Variant, fill_nulls: bool) -> object:
        """Each member's value decoded as the value type."""
        out: dict[str, object] = {}
        for i in range(value.n_children()):
            entry = value.get_child_value(i)
            key = entry.get_child_value(0).get_string()
            try:
                out[key] = self.value.decode(entry.get_child_value(1), fill_nulls)
            except Refused as exc:
                raise exc.at(key) from None
        return out


@dataclass(frozen=True)
class Field:
    """One member of a model."""

    codec: Codec
    #: None is a value it may have (then it is left out of the ``a{sv}``).
    nullable: bool
    binary: bool
    #: The model has no default for it.
    required: bool


class Struct(Codec):
    """A model: ``a{sv}``, each member with its declared type."""

    def __init__(self, model: type[BaseModel]) -> None:
        super().__init__("a{sv}")
        self.model = model
        self.fields: dict[str, Field] = {}

    def encode(self, value: object, depth: int = 0) -> dict[str, GLib.Variant]:
        """The ``a{sv}`` of a dumped model (base64 text of binary fields becomes bytes)."""
        model = self.model.__name__
        if not isinstance(value, Mapping):
            raise Refused(f"{type(value).__name__} where {model} (a{{sv}}) is declared")
        for k in value:
            if k not in self.fields:
                raise Refused(f"{model} declares no field {k!r}", (str(k),))
        base64 = value.get("encoding") == "base64"
        out: dict[str, GLib.Variant] = {}
        inner = 0
        for name, f in self.fields.items():
            v = value.get(name)
            if v is None:
                if f.nullable or (name not in value and not f.required):
                    continue
                raise Refused(
                    "missing" if name not in value else "null, which it may not be", (name,)
                )
            inner = inner or deeper(depth, 2)  # the entries, then their members
            try:
                if f.binary and base64 and isinstance(v, str):
                    v = binary.from_base64(v)
                out[name] = f.codec.variant(v, inner)
            except Refused as exc:
                raise exc.at(name) from None
        return out

    def decode(self, value: GLib.Variant, fill_nulls: bool) -> dict[str, object]:
        """The members of an ``a{sv}``; with ``fill_nulls`` the nullable members left out are
        None again (results: as the socket has them), without it they stay absent (parameters:
        absent means "the default", which need not be None)."""
        members: dict[str, GLib.Variant] = {}
        for i in range(value.n_children()):
            entry = value.get_child_value(i)
            members[entry.get_child_value(0).get_string()] = entry.get_child_value(1).get_variant()
        return self.from_members(members, fill_nulls)

    def from_members(
        self, members: Mapping[str, GLib.Variant], fill_nulls: bool
    ) -> dict[str, object]:
        """Members (name → the content of its variant) back to JSON, as :meth:`decode`."""
        out: dict[str, object] = {}
        sent_as_bytes: str | None = None
        for name, v in members.items():
            f = self.fields.get(name)
            try:
                # An undeclared member is kept as it came, for the model's validation to name.
                value = free_from_bus(v) if f is None else f.codec.member(v, fill_nulls)
            except Refused as exc:
                raise exc.at(name) from None
            if f is not None and f.binary and isinstance(value, bytes):
                value = binary.to_base64(value)
                sent_as_bytes = name
            out[name] = value
        # Bytes become base64 text: stored as the text the client said it is, they would be
        # kept as the wrong value with no error.
        if sent_as_bytes is not None and out.setdefault("encoding", "base64") != "base64":
            raise Refused(
                f"bytes (ay) with encoding {out['encoding']!r}: send text (s), or leave "
                "encoding out for bytes",
                (sent_as_bytes,),
            )
        if fill_nulls:
            for name, f in self.fields.items():
                if f.nullable and name not in out:
                    out[name] = None
        return out


FREE = Held(free_variant, free_from_bus)
BINARY = Held(binary.binary_variant, binary.binary_from_bus)
_SCALARS = {bool: Scalar("b"), int: Scalar("x"), float: Scalar("d"), str: Scalar("s")}

_structs: dict[type[BaseModel], Struct] = {}
_structs_lock = threading.RLock()


def struct_codec(model: type[BaseModel]) -> Struct:
    """The codec of a model (built once per model: models do not change)."""
    with _structs_lock:  # the GLib thread, the event loop and SDK threads all come here
        found = _structs.get(model)
        if found is not None:
            return found
        s = _structs[model] = Struct(model)  # registered first: a model may contain itself
        try:
            s.fields = {name: field_codec(f) for name, f in model.model_fields.items()}
            binaries = [name for name, f in s.fields.items() if f.binary]
            if binaries and "encoding" not in s.fields:
                # The bus's bytes and the kernel's base64 text are told apart by it.
                raise TypeError(f"binary field {', '.join(binaries)} needs an encoding field")
        except TypeError as exc:
            del _structs[model]
            raise TypeError(f"{model.__name__}: {exc}") from None
        return s


def field_codec(field: FieldInfo) -> Field:
    """The codec of one model field."""
    # pydantic moves a plain Annotated's extras to metadata, but leaves those of
    # ``Annotated[...] | None`` in the annotation: the codec, not the marker, says binary.
    marked = any(isinstance(m, BusBinary) for m in field.metadata)
    codec = BINARY if marked else codec_for(field.annotation)
    return Field(
        codec, _nullable(field.annotation) or codec is FREE, codec is BINARY, field.is_required()
    )


def codec_for(annotation: object) -> Codec:
    """The codec of a type annotation; TypeError for a type D-Bus cannot carry as declared."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        if any(isinstance(m, BusBinary) for m in args[1:]):
            return BINARY
        return codec_for(args[0])
    if annotation is typing.Any or annotation is object:
        return FREE
    if origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not types.NoneType]
        return codec_for(real[0]) if len(real) == 1 else FREE
    if origin is typing.Literal:
        return _of_values(args, annotation)
    if annotation is list or origin is list:
        item_type = args[0] if args else typing.Any
        item = _contained(item_type, annotation)
        return Array(Maybe(item) if _nullable(item_type) else item)
    if annotation is dict or origin is dict:
        key, value = args or (str, typing.Any)
        if codec_for(key).signature != "s":
            raise TypeError(f"no D-Bus type for {annotation!r} (keys must be strings)")
        return Dict(_contained(value, annotation))
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return struct_codec(annotation)
        if issubclass(annotation, enum.Enum):
            return _of_values(tuple(m.value for m in annotation), annotation)
        for base, codec in _SCALARS.items():  # bool first: bool is an int
            if issubclass(annotation, base):
                return codec
    raise TypeError(f"no D-Bus type for {annotation!r}")


def _contained(annotation: object, container: object) -> Codec:
    """The codec of a list's elements or a dict's values."""
    codec = codec_for(annotation)
    if codec is BINARY:  # its bytes ↔ base64 needs the model's encoding field
        raise TypeError(f"no D-Bus type for {container!r} (BusBinary marks a model's own fields)")
    return codec


def _of_values(values: tuple[object, ...], annotation: object) -> Codec:
    """The scalar all of a Literal's or an enum's values are."""
    for base, codec in _SCALARS.items():
        if values and all(type(v) is base or (base is str and isinstance(v, str)) for v in values):
            return codec
    raise TypeError(f"no D-Bus type for {annotation!r} (its values are of several types)")


def _nullable(annotation: object) -> bool:
    """Whether None is one of the declared type's values."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _nullable(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return types.NoneType in typing.get_args(annotation)
    return annotation is None or annotation is types.NoneType


def signatures(model: type[BaseModel]) -> dict[str, str]:
    """Every member of a model, nested ones included, with its D-Bus signature.

    Paths: ``usage.prompt_tokens`` (a member of a member), ``models[].name`` (a member of a
    list's elements), ``x{}.y`` (of a mapping's values).
    """
    return dict(_paths(struct_codec(model), "", frozenset()))


def _paths(codec: Codec, path: str, seen: frozenset[type[BaseModel]]) -> Iterator[tuple[str, str]]:
    if isinstance(codec, Struct):
        if codec.model in seen:  # a model that contains itself: once is enough
            return
        for name, f in codec.fields.items():
            sub = f"{path}.{name}" if path else name
            yield sub, f.codec.signature
            yield from _paths(f.codec, sub, seen | {codec.model})
    elif isinstance(codec, (Array, Maybe)):
        yield from _paths(codec.item, path + "[]", seen)
    elif isinstance(codec, Dict):
        yield from _paths(codec.value, path + "{}", seen)


def result_vardict(model: type[BaseModel], result: Mapping[str, object]) -> dict[str, GLib.Variant]:
    """A syscall's result as the ``a{sv}`` it is sent as: a reply, or a Finished signal."""
    # A value D-Bus cannot carry is the client's to read elsewhere (NotSupported); one not of
    # the declared type is the daemon's own fault (TypeError, logged by the caller).
    try:
        return struct_codec(model).encode(result)  # the reply's one argument: depth 0
    except Beyond as exc:
        raise NotSupported(f"result member {exc}; read it over the socket") from None
    except NotCarried as exc:
        raise NotSupported(
            f"result member {exc}; read it over the socket (or store such values as base64)"
        ) from None
    except Refused as exc:
        raise TypeError(f"{model.__name__}.{exc}") from None


#: The D-Bus specification's largest message (dbus-daemon's default for the system bus is
#: 32 MiB: ``max_message_size``).
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
#: A D-Bus message is never more than 16 times its body as a serialized GVariant (the worst,
#: an empty array of 8-aligned elements, is at most 11 bytes there and 1 in a GVariant), plus
#: room for the message's header.
_WIRE_FACTOR, _HEADER_ROOM = 16, 64 * 1024
#: What the real message's header may have more than the one measured (its destination,
#: the serial it answers, a longer path or name).
_EXACT_ROOM = 1024


def result_body(
    model: type[BaseModel], result: Mapping[str, object], max_bytes: int = MAX_MESSAGE_BYTES
) -> GLib.Variant:
    """The body of a reply or Finished signal carrying a result, as :func:`result_vardict`
    checks it, and no larger than ``max_bytes`` on the bus (NotSupported if it is)."""
    body = GLib.Variant("(a{sv})", (result_vardict(model, result),))
    size = message_bytes(body, max_bytes)
    if size > max_bytes:
        raise NotSupported(
            f"the result is {size} bytes on D-Bus, more than the {max_bytes} a message may "
            "have here (dbus.max_message_bytes); read it over the socket"
        )
    return body


def message_bytes(body: GLib.Variant, limit: int) -> int:
    """The size of a message carrying ``body``: exact when it might exceed ``limit``, else
    an upper bound that is under it (measuring exactly means serializing it once more)."""
    bound = int(body.get_size()) * _WIRE_FACTOR + _HEADER_ROOM
    if bound <= limit:
        return bound
    msg = Gio.DBusMessage.new_signal(names.OBJECT_PATH, names.REQUEST_INTERFACE, "Finished")
    msg.set_body(body)
    blob: bytes = msg.to_blob(Gio.DBusCapabilityFlags.NONE)
    return len(blob) + _EXACT_ROOM


def result_from_bus(model: type[BaseModel], result: GLib.Variant) -> dict[str, object]:
    """A client's view of a result ``a{sv}``: what the socket would have said."""
    return struct_codec(model).decode(result, fill_nulls=True)


def params_from_bus(
    model: type[BaseModel], args: GLib.Variant, required: Sequence[str], has_options: bool
) -> tuple[dict[str, object], list[str]]:
    """A method's arguments as the syscall's params, and the keys its options had."""
    members: dict[str, GLib.Variant] = {}
    for i, name in enumerate(required):
        child = args.get_child_value(i)
        # A ``v`` argument holds its value as an a{sv} member does; others are the value.
        members[name] = child.get_variant() if child.get_type_string() == "v" else child
    option_keys: list[str] = []
    if has_options:
        options = args.get_child_value(len(required))
        for i in range(options.n_children()):
            entry = options.get_child_value(i)
            key = entry.get_child_value(0).get_string()
            option_keys.append(key)
            members.setdefault(key, entry.get_child_value(1).get_variant())
    try:
        return struct_codec(model).from_members(members, fill_nulls=False), option_keys
    except Refused as exc:
        raise params_error(exc) from None


def field_codecs(model: type[BaseModel]) -> Mapping[str, Field]:
    """A model's fields and their codecs."""
    return struct_codec(model).fields


def params_error(exc: Refused) -> AiosError:
    """The error a client gets for a parameter that cannot cross the bus as it is."""
    if isinstance(exc, NotCarried) and not isinstance(exc, Beyond):
        return NotSupported(f"{exc}; send it over the socket (a binary value: as bytes)")
    field = exc.where or "(params)"
    return InvalidParams(
        f"invalid params: {field}: {exc.reason}",
        data={"errors": [{"field": field, "message": exc.reason}]},
    )


def arg_to_bus(name: str, f: Field, value: object) -> object:
    """A client's value for typed argument ``name``, in the form GLib takes for its signature."""
    # Checked here, not left to GLib: GLib would convert a value of another type (1.9 or
    # True to an ``x``) or fail with an error that names nothing.
    try:
        return f.codec.encode(value)
    except Refused as exc:
        raise params_error(exc.at(name)) from None

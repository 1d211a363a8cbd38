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

Going back (results in the SDK, parameters in the daemon), values are read from the variants
with the same codecs.  That side is lenient: a value of another shape than declared is passed
on as it is, for the models' validation to name.
"""

from __future__ import annotations

import enum
import threading
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from gi.repository import GLib
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from aiosd.api.dbus import binary
from aiosd.api.dbus.variants import free_from_bus, free_vardict, free_variant
from aiosd.kernel.syscall_base import BusBinary

_INT64 = (-(2**63), 2**63 - 1)
#: Types a JSON dump turns into arrays.
_SEQUENCES: tuple[object, ...] = (list, tuple, set, frozenset, Sequence)


class Codec:
    """How values of one declared type travel: their signature, and the way there and back."""

    def __init__(self, signature: str) -> None:
        self.signature = signature

    def encode(self, value: object) -> object:
        """A JSON value in the form GLib takes for this signature (a variant wherever it has
        ``v``); TypeError if the value does not have the declared type."""
        raise NotImplementedError

    def variant(self, value: object) -> GLib.Variant:
        """The value as the variant of an ``a{sv}`` member."""
        return GLib.Variant(self.signature, self.encode(value))

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

    def encode(self, value: object) -> object:
        """The value itself (a float for ``d``)."""
        sig = self.signature
        if isinstance(value, bool):
            if sig == "b":
                return value
        elif isinstance(value, int):
            if sig == "x" and _INT64[0] <= value <= _INT64[1]:
                return value
            if sig == "d":
                return float(value)
        elif isinstance(value, float):
            if sig == "d":
                return value
        elif isinstance(value, str) and sig == "s":
            return value
        raise TypeError(f"{type(value).__name__} {value!r:.40} where {sig} is declared")


class Free(Codec):
    """A free-form value: ``v``, holding the type the value has."""

    def __init__(self) -> None:
        super().__init__("v")

    def encode(self, value: object) -> GLib.Variant:
        """The variant the value's own type calls for."""
        return free_variant(value)

    def variant(self, value: object) -> GLib.Variant:
        """A member's variant is the value's own."""
        return free_variant(value)

    def decode(self, value: GLib.Variant, fill_nulls: bool) -> object:
        """The value a ``v`` holds."""
        return free_from_bus(value.get_variant())

    def member(self, value: GLib.Variant, fill_nulls: bool) -> object:
        """A member is the value itself."""
        return free_from_bus(value)


class Binary(Codec):
    """A BusBinary field: ``v`` holding ``s`` (text) or ``ay`` (bytes)."""

    def __init__(self) -> None:
        super().__init__("v")

    def encode(self, value: object) -> GLib.Variant:
        """``ay`` for bytes, ``s`` for text."""
        return binary.binary_variant(value)

    def variant(self, value: object) -> GLib.Variant:
        """A member's variant is the value's own."""
        return binary.binary_variant(value)

    def decode(self, value: GLib.Variant, fill_nulls: bool) -> object:
        """Bytes or text, from the ``v``."""
        return binary.binary_from_bus(value.get_variant())

    def member(self, value: GLib.Variant, fill_nulls: bool) -> object:
        """Bytes or text."""
        return binary.binary_from_bus(value)


class Array(Codec):
    """``list[T]``: ``aT``."""

    def __init__(self, item: Codec) -> None:
        super().__init__("a" + item.signature)
        self.item = item

    def encode(self, value: object) -> list[object]:
        """Each element encoded as the item type."""
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{type(value).__name__} where {self.signature} is declared")
        return [self.item.encode(v) for v in value]

    def decode(self, value: GLib.Variant, fill_nulls: bool) -> object:
        """Each element decoded as the item type."""
        item = self.item
        return [
            item.decode(value.get_child_value(i), fill_nulls) for i in range(value.n_children())
        ]


class Maybe(Codec):
    """An element declared ``T | None``: an array of no value (null) or one ``T``."""

    def __init__(self, item: Codec) -> None:
        super().__init__("a" + item.signature)
        self.item = item

    def encode(self, value: object) -> list[object]:
        """``[]`` for None, else ``[value]``."""
        return [] if value is None else [self.item.encode(value)]

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

    def encode(self, value: object) -> dict[str, object]:
        """Each member's value encoded as the value type."""
        if not isinstance(value, Mapping):
            raise TypeError(f"{type(value).__name__} where {self.signature} is declared")
        return {str(k): self.value.encode(v) for k, v in value.items() if v is not None}

    def decode(self, value: GLib.Variant, fill_nulls: bool) -> object:
        """Each member's value decoded as the value type."""
        out: dict[str, object] = {}
        for i in range(value.n_children()):
            entry = value.get_child_value(i)
            key = entry.get_child_value(0).get_string()
            out[key] = self.value.decode(entry.get_child_value(1), fill_nulls)
        return out


@dataclass(frozen=True)
class Field:
    """One member of a model."""

    codec: Codec
    #: None is a value it may have (then it is left out of the ``a{sv}``).
    nullable: bool
    binary: bool


class Struct(Codec):
    """A model: ``a{sv}``, each member with its declared type."""

    def __init__(self, model: type[BaseModel]) -> None:
        super().__init__("a{sv}")
        self.model = model
        self.fields: dict[str, Field] = {}

    def encode(self, value: object) -> dict[str, GLib.Variant]:
        """The ``a{sv}`` of a dumped model (base64 text of binary fields becomes bytes)."""
        if not isinstance(value, Mapping):
            raise TypeError(f"{type(value).__name__} where model {self.model.__name__} is declared")
        unknown = sorted(str(k) for k in value if k not in self.fields)
        if unknown:
            raise TypeError(f"{self.model.__name__} declares no field {', '.join(unknown)}")
        base64 = value.get("encoding") == "base64"
        out: dict[str, GLib.Variant] = {}
        for name, f in self.fields.items():
            v = value.get(name)
            if v is None:
                if not f.nullable:
                    raise TypeError(f"{self.model.__name__}.{name} is missing or null")
                continue
            if f.binary and base64 and isinstance(v, str):
                v = binary.from_base64(v)
            try:
                out[name] = f.codec.variant(v)
            except TypeError as exc:
                raise TypeError(f"{self.model.__name__}.{name}: {exc}") from None
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
        for name, v in members.items():
            f = self.fields.get(name)
            # An undeclared member is kept as it came, for the model's validation to name.
            value = free_from_bus(v) if f is None else f.codec.member(v, fill_nulls)
            if f is not None and f.binary and isinstance(value, bytes):
                value = binary.to_base64(value)
                out.setdefault("encoding", "base64")
            out[name] = value
        if fill_nulls:
            for name, f in self.fields.items():
                if f.nullable and name not in out:
                    out[name] = None
        return out


FREE = Free()
BINARY = Binary()
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
        except TypeError as exc:
            del _structs[model]
            raise TypeError(f"{model.__name__}: {exc}") from None
        return s


def field_codec(field: FieldInfo) -> Field:
    """The codec of one model field (pydantic keeps its ``Annotated`` extras in metadata)."""
    is_binary = any(isinstance(m, BusBinary) for m in field.metadata)
    codec = BINARY if is_binary else codec_for(field.annotation)
    return Field(codec, _nullable(field.annotation) or codec is FREE, is_binary)


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
    if annotation in _SEQUENCES or origin in _SEQUENCES:
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise TypeError(f"no D-Bus type for {annotation!r} (only tuple[T, ...])")
        item_type = args[0] if args else typing.Any
        item = codec_for(item_type)
        return Array(Maybe(item) if _nullable(item_type) else item)
    if annotation is dict or origin in (dict, Mapping):
        key, value = args or (str, typing.Any)
        if codec_for(key).signature != "s":
            raise TypeError(f"no D-Bus type for {annotation!r} (keys must be strings)")
        return Dict(codec_for(value))
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return struct_codec(annotation)
        if issubclass(annotation, enum.Enum):
            return _of_values(tuple(m.value for m in annotation), annotation)
        for base, codec in _SCALARS.items():  # bool first: bool is an int
            if issubclass(annotation, base):
                return codec
    raise TypeError(f"no D-Bus type for {annotation!r}")


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
    return struct_codec(model).encode(result)


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
    return struct_codec(model).from_members(members, fill_nulls=False), option_keys


def field_codecs(model: type[BaseModel]) -> Mapping[str, Field]:
    """A model's fields and their codecs."""
    return struct_codec(model).fields


def arg_to_bus(f: Field, value: object) -> object:
    """A client's value for a typed argument, in the form GLib takes for its signature.

    A value that is not of the declared type goes as near to it as the signature allows,
    typed from itself, so that the daemon's validation can say what is wrong with it.
    """
    try:
        return f.codec.encode(value)
    except TypeError:
        sig = f.codec.signature
        if sig == "v":
            return free_variant(value)
        if sig == "a{sv}" and isinstance(value, Mapping):
            return free_vardict(value)
        if sig == "aa{sv}" and isinstance(value, (list, tuple)):
            return [free_vardict(v) if isinstance(v, Mapping) else v for v in value]
        return value

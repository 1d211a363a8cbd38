"""Free-form values ↔ GLib variants: the one place a D-Bus type comes from the value itself.

Only what a model declares without a fixed type travels this way (``dict[str, Any]``,
``Any``, a union of several types); every other field has the signature its model declares
(:mod:`aiosd.api.dbus.codec`).  Free-form values are JSON, and become:

- ``bool`` → ``b``, ``int`` → ``x``, ``float`` → ``d``, ``str`` → ``s``;
- an object → ``a{sv}``; a member whose value is null is left out;
- an array → ``av``, always (``[]`` and ``["a"]`` have the same type), each element a variant
  typed by these rules;
- a null element of an array → an empty byte array (``ay``).  D-Bus has no null, and leaving
  the element out would move the ones after it; JSON has no bytes, so nothing else is ``ay``.

Reading back, an empty ``ay`` is null again, and any other D-Bus type a client sends is
taken for its natural JSON value.
"""

from __future__ import annotations

from collections.abc import Mapping

from gi.repository import GLib

#: The type a null element of a free-form array travels as (see the module docstring).
NULL_SIGNATURE = "ay"


def null_variant() -> GLib.Variant:
    """What a null element of a free-form array is on the bus."""
    return GLib.Variant(NULL_SIGNATURE, b"")


def free_variant(value: object) -> GLib.Variant:
    """A free-form value as the variant its own type calls for."""
    if isinstance(value, GLib.Variant):
        return value
    if value is None:
        return null_variant()
    if isinstance(value, bool):
        return GLib.Variant("b", value)
    if isinstance(value, int):
        return GLib.Variant("x", value)
    if isinstance(value, float):
        return GLib.Variant("d", value)
    if isinstance(value, str):
        return GLib.Variant("s", value)
    if isinstance(value, (bytes, bytearray)):
        # Not JSON: raw bytes a client passes where a parameter is free-form.
        return bytes_variant(bytes(value))
    if isinstance(value, Mapping):
        return GLib.Variant("a{sv}", free_vardict(value))
    if isinstance(value, (list, tuple)):
        return GLib.Variant("av", [free_variant(v) for v in value])
    raise TypeError(f"no D-Bus type for a free-form {type(value).__name__}")


def free_vardict(mapping: Mapping[str, object]) -> dict[str, GLib.Variant]:
    """A free-form object as an ``a{sv}``; members whose value is null are left out."""
    return {str(k): free_variant(v) for k, v in mapping.items() if v is not None}


def free_from_bus(value: GLib.Variant) -> object:
    """A free-form variant back to JSON: an empty ``ay`` (a null) becomes None."""
    sig: str = value.get_type_string()
    if sig == "v":
        return free_from_bus(value.get_variant())
    if sig == "ay":
        data = variant_bytes(value)
        return data if data else None
    if sig.startswith("a{"):
        out: dict[object, object] = {}
        for i in range(value.n_children()):
            entry = value.get_child_value(i)
            out[entry.get_child_value(0).unpack()] = free_from_bus(entry.get_child_value(1))
        return out
    if sig.startswith(("a", "(")):
        return [free_from_bus(value.get_child_value(i)) for i in range(value.n_children())]
    return value.unpack()


def bytes_variant(data: bytes) -> GLib.Variant:
    """An ``ay`` made from the bytes in one piece (not one child per byte)."""
    return GLib.Variant.new_from_bytes(GLib.VariantType.new("ay"), GLib.Bytes.new(data), True)


def variant_bytes(value: GLib.Variant) -> bytes:
    """The bytes of an ``ay`` as they are (``unpack()`` would make one int per byte)."""
    return bytes(value.get_data_as_bytes().get_data() or b"")

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

Reading back, an empty ``ay`` is null again, a non-empty one is refused (JSON has no bytes,
and whatever reads free-form data takes it for JSON), and any other D-Bus type a client sends
is taken for its natural JSON value.

Nothing is ever changed on the way: a value GLib would convert or cut (text holding NUL,
an integer beyond ``x``) is refused with a :class:`Refused` naming where it is.  Nor is a value
ever sent that would make its message one the bus refuses (dbus-daemon drops the connection
of a sender whose message is invalid, and every client's calls with it): containers nested
deeper than :data:`MAX_DEPTH` are refused the same way, with :class:`Beyond`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from gi.repository import GLib

#: The type a null element of a free-form array travels as (see the module docstring).
NULL_SIGNATURE = "ay"
INT64 = (-(2**63), 2**63 - 1)
#: How deep a message's values may nest containers (arrays with elements, structures, dict
#: entries and variants, all counted), from its arguments (depth 0) on: the D-Bus
#: specification's 32 arrays plus 32 structures, which dbus-daemon also applies to the
#: nesting variants make.  Each level of a free-form object is three (``a{sv}``: the array,
#: its entries, the variant), so free-form data nests at most about 20 objects deep.
MAX_DEPTH = 64
#: What no D-Bus string may hold: NUL (GLib would cut the text there) and lone surrogates
#: (not UTF-8).
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


class Refused(TypeError):
    """A value that cannot cross the bus as it is; ``path`` names the member it is at."""

    def __init__(self, reason: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path

    def at(self, step: str | int) -> Refused:
        """The same refusal, seen from the member that holds this one."""
        return type(self)(self.reason, (step, *self.path))

    @property
    def where(self) -> str:
        """The path as validation errors write it, ``messages.0.content`` (NUL as ``\\x00``)."""
        return ".".join(str(p) for p in self.path).replace("\x00", "\\x00")

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" if self.path else self.reason


class NotCarried(Refused):
    """A value of the declared type that D-Bus has no room for: text holding NUL (or a lone
    surrogate), or one of :class:`Beyond`'s."""


class Beyond(NotCarried):
    """A value beyond what any D-Bus message may hold: an integer out of the range of its
    D-Bus type, containers nested deeper than :data:`MAX_DEPTH`."""


def text(value: str) -> str:
    """The text itself; NotCarried if it holds NUL, where GLib would silently cut it, or a
    lone surrogate, which is not UTF-8."""
    bad = _NOT_TEXT.search(value)
    if bad is not None:
        if bad.group() == "\x00":
            raise NotCarried("text contains NUL, which a D-Bus string cannot carry")
        raise NotCarried(f"text contains a lone surrogate at offset {bad.start()} (not UTF-8)")
    return value


#: Longest error message sent, in characters (messages name what was wrong; none needs more).
MAX_MESSAGE_CHARS = 4096


def message_text(message: str) -> str:
    """An error message as one D-Bus string, whatever callers it quotes: UTF-8, no NUL,
    at most :data:`MAX_MESSAGE_CHARS` long."""
    text = message[:MAX_MESSAGE_CHARS].encode("utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\x00", "\\x00")


def int_beyond(value: int, what: str) -> Beyond:
    """The refusal of an integer out of the range of ``what``."""
    # Named by its size when long: str() of an int of thousands of digits is itself refused.
    shown = str(value) if value.bit_length() <= 128 else f"of {value.bit_length()} bits"
    return Beyond(f"integer {shown} is beyond {what}")


def deeper(depth: int, levels: int) -> int:
    """The depth ``levels`` below ``depth``; Beyond if a message may not nest that deep."""
    if depth + levels > MAX_DEPTH:
        raise Beyond(
            f"nested deeper than a D-Bus message may hold ({MAX_DEPTH} levels of containers)"
        )
    return depth + levels


def null_variant() -> GLib.Variant:
    """What a null element of a free-form array is on the bus."""
    return GLib.Variant(NULL_SIGNATURE, b"")


def free_variant(value: object, depth: int = 0) -> GLib.Variant:
    """A free-form (JSON) value as the variant its own type calls for.

    ``depth`` is where the value sits in its message (the content of a variant is one level
    below the variant); containers that would nest deeper than :data:`MAX_DEPTH` are Beyond.
    """
    if isinstance(value, GLib.Variant):  # a client's own choice of type, for an option
        return value
    if value is None:
        return null_variant()
    if isinstance(value, bool):
        return GLib.Variant("b", value)
    if isinstance(value, int):
        if not INT64[0] <= value <= INT64[1]:
            raise int_beyond(value, "int64 (x)")
        return GLib.Variant("x", value)
    if isinstance(value, float):
        return GLib.Variant("d", value)
    if isinstance(value, str):
        return GLib.Variant("s", text(value))
    if isinstance(value, Mapping):
        return GLib.Variant("a{sv}", free_vardict(value, depth))
    if isinstance(value, (list, tuple)):
        items = []
        if value:
            inner = deeper(depth, 2)  # the av's elements, then what each variant holds
            for i, v in enumerate(value):
                try:
                    items.append(free_variant(v, inner))
                except Refused as exc:
                    raise exc.at(i) from None
        return GLib.Variant("av", items)
    raise Refused(f"{type(value).__name__} is not JSON: free-form values are JSON")


def free_vardict(mapping: Mapping[str, object], depth: int = 0) -> dict[str, GLib.Variant]:
    """A free-form object as an ``a{sv}`` (at ``depth`` in its message); members whose value
    is null are left out."""
    out: dict[str, GLib.Variant] = {}
    inner = 0
    for k, v in mapping.items():
        if v is None:
            continue
        # The a{sv}'s entries, their members, then what each member's variant holds.
        inner = inner or deeper(depth, 3)
        key = str(k)
        try:
            out[text(key)] = free_variant(v, inner)
        except Refused as exc:
            raise exc.at(key) from None
    return out


def free_from_bus(value: GLib.Variant) -> object:
    """A free-form variant back to JSON: an empty ``ay`` (a null) becomes None."""
    sig: str = value.get_type_string()
    if sig == "v":
        return free_from_bus(value.get_variant())
    if sig == "ay":
        if value.n_children():
            raise Refused(
                "bytes (ay) where JSON is expected: send text, or the bytes as a list of numbers"
            )
        return None
    if sig.startswith("a{"):
        out: dict[object, object] = {}
        for i in range(value.n_children()):
            entry = value.get_child_value(i)
            key = entry.get_child_value(0).unpack()
            try:
                out[key] = free_from_bus(entry.get_child_value(1))
            except Refused as exc:
                raise exc.at(key) from None
        return out
    if sig.startswith(("a", "(")):
        items = []
        for i in range(value.n_children()):
            try:
                items.append(free_from_bus(value.get_child_value(i)))
            except Refused as exc:
                raise exc.at(i) from None
        return items
    return value.unpack()


def bytes_variant(data: bytes) -> GLib.Variant:
    """An ``ay`` made from the bytes in one piece (not one child per byte)."""
    return GLib.Variant.new_from_bytes(GLib.VariantType.new("ay"), GLib.Bytes.new(data), True)


def variant_bytes(value: GLib.Variant) -> bytes:
    """The bytes of an ``ay`` as they are (``unpack()`` would make one int per byte)."""
    return bytes(value.get_data_as_bytes().get_data() or b"")

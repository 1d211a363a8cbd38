"""Binary values on D-Bus: ``ay`` on the bus, base64 text (with ``encoding``) in the kernel.

A field marked :class:`~aiosd.kernel.syscall_base.BusBinary` is a ``v``: ``s`` when the value
is text, ``ay`` when it is bytes.  The kernel keeps such values as base64 text with
``encoding = "base64"``, so bytes arriving from the bus become that, and a result's base64
text goes on the bus as its bytes (:data:`aiosd.api.dbus.codec.BINARY`).
"""

from __future__ import annotations

import base64

from gi.repository import GLib

from aiosd.api.dbus.variants import Refused, bytes_variant, free_from_bus, text, variant_bytes


def binary_variant(value: object, depth: int = 0) -> GLib.Variant:
    """Bytes as ``ay``, text as ``s`` (never cut: text holding NUL is refused); neither nests
    anything, so ``depth`` (where it sits) asks for nothing."""
    if isinstance(value, (bytes, bytearray)):
        return bytes_variant(bytes(value))
    if isinstance(value, str):
        return GLib.Variant("s", text(value))
    raise Refused(f"{type(value).__name__} where bytes or text are declared")


def binary_from_bus(value: GLib.Variant) -> object:
    """The bytes of an ``ay`` or the text of an ``s``; anything else as it came."""
    sig = value.get_type_string()
    if sig == "ay":
        return variant_bytes(value)
    if sig == "s":
        return str(value.get_string())
    return free_from_bus(value)


def from_base64(data: str) -> bytes:
    """A result's base64 text as the bytes that go on the bus."""
    return base64.b64decode(data)


def to_base64(data: bytes) -> str:
    """Bytes from the bus as the base64 text the kernel and the socket use."""
    return base64.b64encode(data).decode("ascii")

"""JSON-like values ↔ GLib variants, for ``a{sv}`` dictionaries and typed arguments."""

from __future__ import annotations

from typing import Any

from gi.repository import GLib


def to_variant(value: Any) -> GLib.Variant:
    """Wrap a JSON-like value in the most natural variant type."""
    if isinstance(value, GLib.Variant):
        return value
    if isinstance(value, bool):
        return GLib.Variant("b", value)
    if isinstance(value, int):
        return GLib.Variant("x", value)
    if isinstance(value, float):
        return GLib.Variant("d", value)
    if isinstance(value, str):
        return GLib.Variant("s", value)
    if isinstance(value, bytes):
        return GLib.Variant("ay", value)
    if isinstance(value, dict):
        return GLib.Variant("a{sv}", to_vardict(value))
    if isinstance(value, (list, tuple)):
        items = [v for v in value if v is not None]
        if items and all(isinstance(v, str) for v in items):
            return GLib.Variant("as", items)
        if items and all(isinstance(v, dict) for v in items):
            return GLib.Variant("aa{sv}", [to_vardict(v) for v in items])
        return GLib.Variant("av", [to_variant(v) for v in items])
    raise TypeError(f"no D-Bus type for {type(value).__name__}")


def to_vardict(mapping: dict[str, Any]) -> dict[str, GLib.Variant]:
    """A dict for an ``a{sv}`` argument; keys whose value is None are left out."""
    return {str(k): to_variant(v) for k, v in mapping.items() if v is not None}

"""Binary values on D-Bus: ``ay`` on the bus, base64 text (with ``encoding``) in the kernel."""

from __future__ import annotations

import base64
import functools
from typing import Any

from gi.repository import GLib
from pydantic import BaseModel

from aiosd.api.dbus.variants import to_vardict
from aiosd.kernel.syscall_base import BusBinary


@functools.cache
def binary_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """Names of a model's fields marked BusBinary (models are fixed: computed once each)."""
    return tuple(
        name
        for name, field in model.model_fields.items()
        if any(isinstance(m, BusBinary) for m in field.metadata)
    )


def params_from_bus(model: type[BaseModel], call: dict[str, Any]) -> dict[str, Any]:
    """Bytes that arrived as ``ay`` become base64 text with ``encoding = "base64"``."""
    for name in binary_fields(model):
        value = call.get(name)
        if isinstance(value, (bytes, bytearray)):
            call[name] = base64.b64encode(bytes(value)).decode("ascii")
            call.setdefault("encoding", "base64")
    return call


def result_to_bus(model: type[BaseModel], result: dict[str, Any]) -> dict[str, Any]:
    """Base64 values of a result go on the bus as bytes (``ay``)."""
    if result.get("encoding") != "base64":
        return result
    for name in binary_fields(model):
        if isinstance(result.get(name), str):
            result = {**result, name: base64.b64decode(result[name])}
    return result


def result_vardict(model: type[BaseModel], result: dict[str, Any]) -> dict[str, GLib.Variant]:
    """A syscall's result as the ``a{sv}`` it is sent as: a reply, or a Finished signal."""
    return to_vardict(result_to_bus(model, result))


def result_from_bus(result: Any) -> Any:
    """A client's view: bytes from the bus back to base64 text, as on the socket."""
    if isinstance(result, dict):
        return {
            k: base64.b64encode(bytes(v)).decode("ascii")
            if isinstance(v, (bytes, bytearray))
            else v
            for k, v in result.items()
        }
    return result

"""The one error tree of aiosd.

Every error a client can see is an :class:`AiosError` subclass.  Each class states its
JSON-RPC code and its D-Bus error name once, here; the transports map errors through the
class attributes, :func:`error_for_code` and :func:`error_for_dbus_name`, and nowhere else.

Both maps are one-to-one: a class that states a code or a D-Bus name of its own must state
both, and one that another class already has is refused when it is defined (TypeError), so
a client rebuilding an error from either one gets the class that stated them.  A subclass
that states neither refines its parent inside the daemon (``class OllamaTimeout(
BackendUnavailable)``) and reaches clients as that parent.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

DBUS_ERROR_PREFIX = "org.aiosd.Daemon1.Error."
#: The last element of a D-Bus error name (the D-Bus specification's rule for one element).
_NAME_ELEMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_BY_CODE: dict[int, type[AiosError]] = {}
_BY_DBUS_NAME: dict[str, type[AiosError]] = {}


def _register(cls: type[AiosError]) -> None:
    """Add an error class to both maps, or raise TypeError if it would make either ambiguous."""
    code, name = cls.rpc_code, cls.dbus_name
    if not isinstance(code, int) or isinstance(code, bool):
        raise TypeError(f"{cls.__name__}: rpc_code must be an int, not {code!r}")
    if (
        not isinstance(name, str)
        or not name.startswith(DBUS_ERROR_PREFIX)
        or not _NAME_ELEMENT.fullmatch(name[len(DBUS_ERROR_PREFIX) :])
        or len(name) > 255
    ):
        raise TypeError(f"{cls.__name__}: dbus_name {name!r} is not {DBUS_ERROR_PREFIX}<Name>")
    clashes = [
        f"{attr} {value!r} is already {other.__name__}'s"
        for attr, value, other in (
            ("rpc_code", code, _BY_CODE.get(code)),
            ("dbus_name", name, _BY_DBUS_NAME.get(name)),
        )
        if other is not None
    ]
    if clashes:
        raise TypeError(
            f"{cls.__name__}: {' and '.join(clashes)};"
            " each error class needs a code and a D-Bus name of its own"
        )
    _BY_CODE[code] = cls
    _BY_DBUS_NAME[name] = cls


class AiosError(Exception):
    """Root of every error a client may receive."""

    rpc_code: ClassVar[int] = -32000
    dbus_name: ClassVar[str] = DBUS_ERROR_PREFIX + "Failed"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Register a subclass that states a code or a D-Bus name (see the module doc)."""
        super().__init_subclass__(**kwargs)
        if "rpc_code" in cls.__dict__ or "dbus_name" in cls.__dict__:
            _register(cls)

    def __init__(self, message: str, *, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data: dict[str, Any] = data or {}

    def to_rpc(self) -> dict[str, Any]:
        """The JSON-RPC ``error`` member for this error."""
        err: dict[str, Any] = {"code": self.rpc_code, "message": self.message}
        if self.data:
            err["data"] = self.data
        return err


_register(AiosError)


class ParseError(AiosError):
    """The frame is not valid JSON."""

    rpc_code = -32700
    dbus_name = DBUS_ERROR_PREFIX + "ParseError"


class InvalidRequest(AiosError):
    """The frame is JSON but not a JSON-RPC 2.0 request."""

    rpc_code = -32600
    dbus_name = DBUS_ERROR_PREFIX + "InvalidRequest"


class MethodNotFound(AiosError):
    """No syscall has this name."""

    rpc_code = -32601
    dbus_name = DBUS_ERROR_PREFIX + "UnknownMethod"


class InvalidParams(AiosError):
    """The parameters do not validate; ``data.errors`` names each field path."""

    rpc_code = -32602
    dbus_name = DBUS_ERROR_PREFIX + "InvalidArgs"


class InternalError(AiosError):
    """An unexpected failure inside the daemon; details are in the daemon's log only."""

    rpc_code = -32603
    dbus_name = DBUS_ERROR_PREFIX + "Internal"


class PermissionDenied(AiosError):
    """The caller's Unix identity does not allow this syscall."""

    rpc_code = -32001
    dbus_name = DBUS_ERROR_PREFIX + "PermissionDenied"


class Busy(AiosError):
    """A queue is full; ``data.queue_length`` and ``data.limit`` say how full."""

    rpc_code = -32002
    dbus_name = DBUS_ERROR_PREFIX + "Busy"


class ContextTooLong(AiosError):
    """The prompt does not fit the model's context; ``data`` names both sizes."""

    rpc_code = -32003
    dbus_name = DBUS_ERROR_PREFIX + "ContextTooLong"


class ModelNotFound(AiosError):
    """No configured model (or no model on the backend server) has this name."""

    rpc_code = -32004
    dbus_name = DBUS_ERROR_PREFIX + "ModelNotFound"


class BackendUnavailable(AiosError):
    """The model's backend cannot be reached or failed."""

    rpc_code = -32005
    dbus_name = DBUS_ERROR_PREFIX + "BackendUnavailable"


class Cancelled(AiosError):
    """A generation ended without finishing (its backend stream stopped early)."""

    rpc_code = -32006
    dbus_name = DBUS_ERROR_PREFIX + "Cancelled"


class FrameTooLarge(AiosError):
    """A frame exceeded the configured maximum size; the connection is closed after it."""

    rpc_code = -32007
    dbus_name = DBUS_ERROR_PREFIX + "FrameTooLarge"


class TooManyRequests(AiosError):
    """The connection already has the maximum number of requests in flight."""

    rpc_code = -32008
    dbus_name = DBUS_ERROR_PREFIX + "TooManyRequests"


class TooManyConnections(AiosError):
    """The daemon already serves the maximum number of connections."""

    rpc_code = -32009
    dbus_name = DBUS_ERROR_PREFIX + "TooManyConnections"


class ShuttingDown(AiosError):
    """The daemon is stopping and takes no new work."""

    rpc_code = -32010
    dbus_name = DBUS_ERROR_PREFIX + "ShuttingDown"


class NotSupported(AiosError):
    """Not possible this way: the model's backend lacks it (tools), or D-Bus cannot carry it."""

    rpc_code = -32011
    dbus_name = DBUS_ERROR_PREFIX + "NotSupported"


class NotFound(AiosError):
    """No such entry — or one the caller may not see: the two are never told apart."""

    rpc_code = -32012
    dbus_name = DBUS_ERROR_PREFIX + "NotFound"


class QuotaExceeded(AiosError):
    """A write would exceed the caller's quota; ``data`` has the quota and current use."""

    rpc_code = -32013
    dbus_name = DBUS_ERROR_PREFIX + "QuotaExceeded"


def error_for_dbus_name(name: str, message: str) -> AiosError:
    """Rebuild the error a D-Bus error name stands for (an unknown name stays in the message)."""
    cls = _BY_DBUS_NAME.get(name)
    return AiosError(f"{name}: {message}") if cls is None else cls(message)


def error_for_code(code: int, message: str, data: dict[str, Any] | None = None) -> AiosError:
    """Rebuild the error class a JSON-RPC error code stands for (used by clients)."""
    return _BY_CODE.get(code, AiosError)(message, data=data)

"""Request objects: ``/org/aiosd/Daemon1/request/N``, one per started long operation.

A request object lives while its syscall runs.  It emits ``Token`` for each streamed piece,
then ``Finished`` (the result) or ``Failed`` (error name and message), and disappears.
Everything it emits goes to the connection that started it, and nobody else may call it or
read it: to other connections it does not exist.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gi.repository import Gio, GLib

from aiosd.api.dbus import names, properties
from aiosd.api.dbus.codec import result_vardict
from aiosd.api.dbus.introspection import request_xml
from aiosd.errors import AiosError, Cancelled, InternalError, NotSupported

if TYPE_CHECKING:
    from aiosd.kernel.syscall_base import Syscall

log = logging.getLogger(__name__)

_INTERFACE = Gio.DBusNodeInfo.new_for_xml(request_xml()).interfaces[0]


class RequestObject:
    """One running request on the bus."""

    def __init__(
        self,
        forget: Callable[[RequestObject], None],
        con: Gio.DBusConnection,
        path: str,
        owner: str,
        syscall: Syscall,
    ) -> None:
        #: Called once the object is gone from the bus, on the event loop's thread (where
        #: :meth:`run` ends).
        self._forget = forget
        self.con = con
        self.path = path
        self.owner = owner
        self.syscall = syscall.name
        self._result_model = syscall.result
        #: pending (accepted, nothing produced yet) → streaming → finished | failed | cancelled
        self.state = "pending"
        self.future: concurrent.futures.Future[None] | None = None
        self._regs = [
            con.register_object(path, iface, self._on_call, None, None)
            for iface in (_INTERFACE, properties.INTERFACE)
        ]

    def properties(self) -> dict[str, GLib.Variant]:
        """The request interface's properties."""
        return {"State": GLib.Variant("s", self.state), "Syscall": GLib.Variant("s", self.syscall)}

    def announce(self) -> None:
        """InterfacesAdded, to the owner only."""
        self._signal(
            names.OBJECT_PATH,
            names.OBJECT_MANAGER,
            "InterfacesAdded",
            GLib.Variant("(oa{sa{sv}})", (self.path, {names.REQUEST_INTERFACE: self.properties()})),
        )

    async def run(self, work: Coroutine[Any, Any, dict[str, Any]]) -> None:
        """Drive the syscall; report how it ended; remove the object."""
        try:
            # Encoded before the state changes: a result that cannot be sent must end as
            # Failed, never as State=finished with no Finished signal.
            result = result_vardict(self._result_model, await work)
        except asyncio.CancelledError:
            self._set_state("cancelled")
            self._emit("Failed", "(ss)", (Cancelled.dbus_name, "the request was cancelled"))
            raise
        except AiosError as exc:
            self._set_state("failed")
            self._emit("Failed", "(ss)", (exc.dbus_name, exc.message))
        except Exception:
            log.exception("request %s (%s) failed", self.path, self.syscall)
            self._set_state("failed")
            self._emit("Failed", "(ss)", (InternalError.dbus_name, "internal error"))
        else:
            self._set_state("finished")
            self._emit("Finished", "(a{sv})", (result,))
        finally:
            self._remove()

    async def emit_token(self, note: dict[str, Any]) -> None:
        """A streamed piece of the answer (called by the kernel for each notification)."""
        content = str(note.get("content", ""))
        if "\x00" in content:
            # GLib would cut the token at the NUL: the generation fails instead.
            raise NotSupported(
                "a token contains NUL, which a D-Bus string cannot carry; ask over the socket"
            )
        if self.state == "pending":
            self._set_state("streaming")
        self._emit("Token", "(ts)", (int(note.get("seq", 0)), content))

    def cancel(self) -> None:
        """Stop the request (thread-safe)."""
        if self.future is not None:
            self.future.cancel()

    def _emit(self, signal: str, signature: str, args: tuple[object, ...]) -> None:
        self._signal(self.path, names.REQUEST_INTERFACE, signal, GLib.Variant(signature, args))

    def _signal(self, path: str, iface: str, signal: str, args: GLib.Variant) -> None:
        try:
            self.con.emit_signal(self.owner, path, iface, signal, args)
        except GLib.Error as exc:  # the bus went away: nobody to tell
            log.debug("signal %s.%s not sent: %s", iface, signal, exc.message)

    def _set_state(self, state: str) -> None:
        self.state = state
        self._signal(
            self.path,
            names.DBUS_PROPERTIES,
            "PropertiesChanged",
            GLib.Variant(
                "(sa{sv}as)", (names.REQUEST_INTERFACE, {"State": GLib.Variant("s", state)}, [])
            ),
        )

    def _remove(self) -> None:
        for reg in self._regs:
            self.con.unregister_object(reg)
        self._signal(
            names.OBJECT_PATH,
            names.OBJECT_MANAGER,
            "InterfacesRemoved",
            GLib.Variant("(oas)", (self.path, [names.REQUEST_INTERFACE])),
        )
        self._forget(self)

    def _on_call(
        self,
        con: Gio.DBusConnection,
        sender: str,
        path: str,
        iface: str,
        method: str,
        params: GLib.Variant,
        invocation: Gio.DBusMethodInvocation,
    ) -> None:
        if sender != self.owner:
            invocation.return_dbus_error(names.DBUS_UNKNOWN_OBJECT, f"no object at {path}")
            return
        if iface == names.REQUEST_INTERFACE and method == "Cancel":
            self.cancel()
            invocation.return_value(None)
        elif iface == names.DBUS_PROPERTIES:
            properties.answer(
                invocation, method, params, {names.REQUEST_INTERFACE: self.properties()}
            )
        else:  # GDBus has checked the call against the interfaces: nothing else gets here
            invocation.return_dbus_error(names.DBUS_UNKNOWN_METHOD, f"no method {iface}.{method}")

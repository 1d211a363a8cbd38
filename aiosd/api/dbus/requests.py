"""Request objects: ``/org/aiosd/Daemon1/request/ID``, one per started long operation.

A request object lives while its syscall runs.  It emits ``Token`` for each streamed piece,
then ``Finished`` (the result) or ``Failed`` (error name and message), and disappears.
Everything it emits goes to the connection that started it, and nobody else may call it or
read it: to other connections it does not exist.  It is registered nowhere with GDBus (whose
introspection would list it for everyone): the front-end hands it its owner's calls, and
lets GDBus answer everybody else's as for a path where nothing is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from gi.repository import Gio, GLib

from aiosd.api.dbus import names, properties
from aiosd.api.dbus.codec import MAX_MESSAGE_BYTES, result_body
from aiosd.api.dbus.introspection import request_introspection
from aiosd.api.dbus.variants import message_text
from aiosd.errors import AiosError, Cancelled, InternalError, NotSupported

if TYPE_CHECKING:
    from aiosd.api.dbus.calls import BusCall
    from aiosd.kernel.syscall_base import Syscall

log = logging.getLogger(__name__)

_INTROSPECTION = GLib.Variant("(s)", (request_introspection(),))
#: What the owner may call, and the signature of each method's arguments.
_METHODS = {
    (names.REQUEST_INTERFACE, "Cancel"): "",
    (names.DBUS_INTROSPECTABLE, "Introspect"): "",
    **{(names.DBUS_PROPERTIES, m): sig for m, sig in properties.SIGNATURES.items()},
}


class RequestObject:
    """One running request on the bus."""

    def __init__(
        self,
        forget: Callable[[RequestObject], None],
        con: Gio.DBusConnection,
        path: str,
        owner: str,
        syscall: Syscall,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
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
        self._max_bytes = max_message_bytes

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

    async def run(self, work: Awaitable[dict[str, Any]]) -> None:
        """Drive the syscall; report how it ended; remove the object."""
        try:
            # Encoded before the state changes: a result that cannot be sent must end as
            # Failed, never as State=finished with no Finished signal.
            body = result_body(self._result_model, await work, self._max_bytes)
        except asyncio.CancelledError:
            self._set_state("cancelled")
            self._emit("Failed", "(ss)", (Cancelled.dbus_name, "the request was cancelled"))
            raise
        except AiosError as exc:
            self._set_state("failed")
            self._emit("Failed", "(ss)", (exc.dbus_name, message_text(exc.message)))
        except Exception:
            log.exception("request %s (%s) failed", self.path, self.syscall)
            self._set_state("failed")
            self._emit("Failed", "(ss)", (InternalError.dbus_name, "internal error"))
        else:
            self._set_state("finished")
            self._signal(self.path, names.REQUEST_INTERFACE, "Finished", body)
        finally:
            self._remove()

    async def emit_token(self, note: dict[str, Any]) -> None:
        """A streamed piece of the answer (called by the kernel for each notification).

        A notification that only counts lines dropped for a slow follower (``agent.logs``)
        is no piece of the answer: the count arrives in the result (``dropped``); nor is a
        confirmation request, nor a step of the tool loop (``steps`` of the result).
        """
        if "dropped" in note or "confirm" in note or "step" in note:
            # (A confirmation request reaches the caller's connections as the manager's
            # ConfirmationRequested signal; a tool loop's steps arrive in the result.)
            return
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
        self._signal(
            names.OBJECT_PATH,
            names.OBJECT_MANAGER,
            "InterfacesRemoved",
            GLib.Variant("(oas)", (self.path, [names.REQUEST_INTERFACE])),
        )
        self._forget(self)

    def handle(self, call: BusCall) -> None:
        """Answer a call of the owner's (the front-end hands it no one else's)."""
        signature = _METHODS.get((call.interface or "", call.member))
        if signature is None:
            call.return_dbus_error(
                names.DBUS_UNKNOWN_METHOD,
                f"no method {call.interface}.{call.member} on {self.path}",
            )
        elif not call.checked(signature):
            return
        elif call.interface == names.REQUEST_INTERFACE:
            self.cancel()
            call.return_value(None)
        elif call.interface == names.DBUS_INTROSPECTABLE:
            call.return_value(_INTROSPECTION)
        else:
            properties.answer(
                call, call.member, call.params, {names.REQUEST_INTERFACE: self.properties()}
            )

"""Method calls as the front-end receives them: the message itself, answered exactly once.

The front-end takes every call to its objects from the connection's message filter, before
GDBus would dispatch it (see :mod:`aiosd.api.dbus.service`), so it answers them itself rather
than through a ``GDBusMethodInvocation``.  GLib's closure-based registration (what PyGObject's
``register_object`` calls; GLib 2.74 has no other a binding can use) hands each invocation to
Python with one reference more than the binding ever drops: every call stayed in memory for
good, ~2 KB and the whole message of a large one.  A :class:`BusCall` holds nothing GLib must free
for it, and its reply is never one the bus would refuse: no larger than ``dbus.max_message_bytes``
(checked here for every reply), valid UTF-8.
"""

from __future__ import annotations

import logging

from gi.repository import Gio, GLib

from aiosd.api.dbus import names
from aiosd.api.dbus.codec import message_bytes
from aiosd.api.dbus.variants import message_text
from aiosd.errors import NotSupported

log = logging.getLogger(__name__)


class BusCall:
    """One method call from the bus, and its one answer (safe to give from any thread)."""

    def __init__(self, con: Gio.DBusConnection, message: Gio.DBusMessage, max_bytes: int) -> None:
        self.con = con
        self.message = message
        self.sender: str = message.get_sender() or ""
        self.path: str = message.get_path() or ""
        #: None when the caller named no interface (D-Bus allows it; aiosd asks for one).
        self.interface: str | None = message.get_interface()
        self.member: str = message.get_member() or ""
        self.signature: str = message.get_signature() or ""
        body = message.get_body()
        self.params: GLib.Variant = body if body is not None else GLib.Variant("()", ())
        self._max_bytes = max_bytes
        self._answered = False

    @property
    def answered(self) -> bool:
        """Whether the call has had its answer."""
        return self._answered

    def get_object_path(self) -> str:
        """The path the call was made on."""
        return self.path

    def checked(self, signature: str) -> bool:
        """Whether the arguments have ``signature``; if not, the call is answered InvalidArgs."""
        if self.signature == signature:
            return True
        self.return_dbus_error(
            names.DBUS_INVALID_ARGS,
            f"arguments of type ({self.signature}) where {self.interface}.{self.member} takes "
            f"({signature})",
        )
        return False

    def return_value(self, value: GLib.Variant | None) -> None:
        """Answer with ``value`` (a tuple, or None for no values); a reply the bus would not
        take is answered NotSupported instead."""
        reply = self.message.new_method_reply()
        if value is not None:
            size = message_bytes(value, self._max_bytes)
            if size > self._max_bytes:
                log.warning(
                    "D-Bus: the reply to %s.%s is %d bytes, more than dbus.max_message_bytes",
                    self.interface,
                    self.member,
                    size,
                )
                self.return_dbus_error(
                    NotSupported.dbus_name,
                    f"the reply is {size} bytes on D-Bus, more than the {self._max_bytes} a "
                    "message may have here (dbus.max_message_bytes)",
                )
                return
            reply.set_body(value)
        self._send(reply)

    def return_dbus_error(self, name: str, message: str) -> None:
        """Answer with the error ``name`` and its message."""
        self._send(self.message.new_method_error_literal(name, message_text(message)))

    def _send(self, reply: Gio.DBusMessage) -> None:
        if self._answered:  # a second answer would be a reply to nothing
            log.error("D-Bus: %s.%s answered twice", self.interface, self.member)
            return
        self._answered = True
        if self.message.get_flags() & Gio.DBusMessageFlags.NO_REPLY_EXPECTED:
            return
        try:
            self.con.send_message(reply, Gio.DBusSendMessageFlags.NONE)
        except GLib.Error as exc:  # the connection is gone: nobody to answer
            log.debug("D-Bus: reply to %s not sent: %s", self.sender, exc.message)

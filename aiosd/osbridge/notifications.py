"""Desktop notifications for a user: ``org.freedesktop.Notifications`` on their session bus.

Runs in the user's worker, as the user: the session bus at ``/run/user/UID/bus`` lets in
only its own user, so the root daemon could not (and must not) post there itself.  No bus
there means no graphical session: that is a result (``delivered: false`` with the reason),
not an error.
"""

from __future__ import annotations

import os
from typing import Any

NOTIFICATIONS = "org.freedesktop.Notifications"
NOTIFICATIONS_PATH = "/org/freedesktop/Notifications"
#: Milliseconds a call to the notification server may take.
CALL_TIMEOUT_MS = 5000
URGENCY = {"low": 0, "normal": 1, "critical": 2}


def session_bus_path(uid: int) -> str:
    """Where the user's session bus listens when they have a session (systemd-logind's)."""
    return f"/run/user/{uid}/bus"


def notify(summary: str, body: str, urgency: str, timeout_ms: int) -> dict[str, Any]:
    """Post a notification to the caller's graphical session."""
    uid = os.getuid()
    path = session_bus_path(uid)
    if not os.path.exists(path):
        return {"delivered": False, "reason": f"no session: {path} does not exist"}
    from gi.repository import Gio, GLib

    flags = (
        Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
        | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
    )
    try:
        bus = Gio.DBusConnection.new_for_address_sync(f"unix:path={path}", flags, None, None)
    except GLib.Error as exc:
        return {
            "delivered": False,
            "reason": f"no session: cannot connect to {path}: {exc.message}",
        }
    try:
        hints = {"urgency": GLib.Variant("y", URGENCY[urgency])}
        reply = bus.call_sync(
            NOTIFICATIONS,
            NOTIFICATIONS_PATH,
            NOTIFICATIONS,
            "Notify",
            GLib.Variant("(susssasa{sv}i)", ("aiosd", 0, "", summary, body, [], hints, timeout_ms)),
            GLib.VariantType("(u)"),
            Gio.DBusCallFlags.NONE,
            CALL_TIMEOUT_MS,
            None,
        )
    except GLib.Error as exc:
        return {"delivered": False, "reason": f"no notification server: {exc.message}"}
    finally:
        bus.close_sync(None)
    return {"delivered": True, "id": reply.unpack()[0]}

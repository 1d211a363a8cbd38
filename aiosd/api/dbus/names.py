"""Every D-Bus name aiosd uses, in one place.  The version is part of the names."""

from __future__ import annotations

import os

SYSTEM_BUS_DEFAULT = "unix:path=/run/dbus/system_bus_socket"


def system_bus_address() -> str:
    """$DBUS_SYSTEM_BUS_ADDRESS, else the standard system bus socket."""
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_DEFAULT


BUS_NAME = "org.aiosd.Daemon1"
OBJECT_PATH = "/org/aiosd/Daemon1"
REQUEST_PATH_PREFIX = OBJECT_PATH + "/request"
#: Agent objects: ``AGENT_PATH_PREFIX/<aid>``, one per live agent.
AGENT_PATH_PREFIX = OBJECT_PATH + "/agent"

INTERFACE_PREFIX = "org.aiosd.Daemon1."
#: One interface on the manager object per syscall family.
FAMILY_INTERFACES = {
    "llm": INTERFACE_PREFIX + "LLM",
    "system": INTERFACE_PREFIX + "System",
    "storage": INTERFACE_PREFIX + "Storage",
    "memory": INTERFACE_PREFIX + "Memory",
    "agent": INTERFACE_PREFIX + "Agent",
    "tool": INTERFACE_PREFIX + "Tool",
}
#: The interface of request objects (long operations such as a streaming chat).
REQUEST_INTERFACE = INTERFACE_PREFIX + "Request"
#: The interface of agent objects (the ``agent.*`` methods are the manager's ``...Agent``).
AGENT_INTERFACE = INTERFACE_PREFIX + "AgentObject"
#: Where the manager's properties live.
PROPERTIES_INTERFACE = FAMILY_INTERFACES["system"]

OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
DBUS_PROPERTIES = "org.freedesktop.DBus.Properties"
DBUS_INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
DBUS_PEER = "org.freedesktop.DBus.Peer"

#: Error names come from aiosd.errors (AiosError.dbus_name); these are the bus's own.
DBUS_INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
DBUS_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
DBUS_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
DBUS_UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
DBUS_UNKNOWN_INTERFACE = "org.freedesktop.DBus.Error.UnknownInterface"
DBUS_UNKNOWN_PROPERTY = "org.freedesktop.DBus.Error.UnknownProperty"
DBUS_PROPERTY_READ_ONLY = "org.freedesktop.DBus.Error.PropertyReadOnly"


def method_name(syscall: str) -> str:
    """``llm.chat`` → ``Chat``; ``storage.put_many`` → ``PutMany``."""
    return "".join(part.capitalize() for part in syscall.split(".", 1)[1].split("_"))


def start_method_name(syscall: str) -> str:
    """The method that starts a streaming syscall as a request object: ``StartChat``."""
    return "Start" + method_name(syscall)


def family_interface(syscall: str) -> str:
    """The interface that carries a syscall's methods (``demo.x`` → ``...Daemon1.Demo``)."""
    family = syscall.split(".", 1)[0]
    # A family of a table a test injects has no entry: its name is derived the same way.
    return FAMILY_INTERFACES.get(family) or INTERFACE_PREFIX + family.capitalize()


def agent_path(aid: str) -> str:
    """The object of agent ``aid`` (an AID is lowercase hex: a valid path element)."""
    return f"{AGENT_PATH_PREFIX}/{aid}"

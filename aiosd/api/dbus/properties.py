"""``org.freedesktop.DBus.Properties`` for aiosd's objects, answered with the standard errors.

The front-end answers these calls itself (GDBus never sees them), here:
``PropertyReadOnly``, ``UnknownProperty`` and ``UnknownInterface`` where the D-Bus
specification names those errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from gi.repository import GLib

from aiosd.api.dbus import names

if TYPE_CHECKING:
    from aiosd.api.dbus.calls import BusCall

#: The interface as the D-Bus specification declares it.
XML = f"""<node>
  <interface name="{names.DBUS_PROPERTIES}">
    <method name="Get">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="out"/>
    </method>
    <method name="GetAll">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="properties" type="a{{sv}}" direction="out"/>
    </method>
    <method name="Set">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="in"/>
    </method>
    <signal name="PropertiesChanged">
      <arg name="interface_name" type="s"/>
      <arg name="changed_properties" type="a{{sv}}"/>
      <arg name="invalidated_properties" type="as"/>
    </signal>
  </interface>
</node>
"""

#: Each method and the signature of its arguments.
SIGNATURES = {"Get": "ss", "GetAll": "s", "Set": "ssv"}

#: Interfaces every object has (GDBus's and this one); none of them has properties.
STANDARD = (names.DBUS_PROPERTIES, names.DBUS_INTROSPECTABLE, names.DBUS_PEER)


def answer(
    invocation: BusCall,
    method: str,
    params: GLib.Variant,
    interfaces: Mapping[str, Mapping[str, GLib.Variant]],
) -> None:
    """Answer a Properties call on an object with ``interfaces`` (name → its properties).

    Every property is read-only.  The arguments have been checked against
    :data:`SIGNATURES`.  An empty interface name (the specification allows it) stands for
    all of them.
    """
    iface = str(params.get_child_value(0).get_string())
    if iface:
        props = interfaces.get(iface)
        if props is None and iface in STANDARD:
            props = {}
    else:
        props = {}
        for some in interfaces.values():
            for name, value in some.items():
                props.setdefault(name, value)  # a name two interfaces share: the first's
    if props is None:
        invocation.return_dbus_error(
            names.DBUS_UNKNOWN_INTERFACE, f"no interface {iface} on {invocation.get_object_path()}"
        )
        return
    if method == "GetAll":
        invocation.return_value(GLib.Variant("(a{sv})", (dict(props),)))
        return
    if method not in ("Get", "Set"):
        invocation.return_dbus_error(
            names.DBUS_UNKNOWN_METHOD, f"no method {names.DBUS_PROPERTIES}.{method}"
        )
        return
    prop = str(params.get_child_value(1).get_string())
    where = iface or "any interface"
    if prop not in props:
        invocation.return_dbus_error(names.DBUS_UNKNOWN_PROPERTY, f"no property {prop} on {where}")
    elif method == "Get":
        invocation.return_value(GLib.Variant("(v)", (props[prop],)))
    else:
        invocation.return_dbus_error(
            names.DBUS_PROPERTY_READ_ONLY, f"property {prop} of {where} is read-only"
        )

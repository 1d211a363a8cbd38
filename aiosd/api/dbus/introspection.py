"""The D-Bus interfaces, generated from the syscall table (so the bus cannot drift from it).

Rule: a syscall ``family.name`` becomes method ``Name`` on interface
``org.aiosd.Daemon1.<Family>``.  Its required parameters are typed arguments in declaration
order; its optional parameters travel in a trailing ``a{sv} options``; the result is an
``a{sv}``.  A streaming syscall also gets ``Start<Name>``, which returns the path of a request
object that emits ``Token`` signals and then ``Finished`` or ``Failed``.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from aiosd.api.dbus import names, properties
from aiosd.api.dbus.codec import field_codecs, struct_codec
from aiosd.kernel.syscall_base import Syscall
from aiosd.kernel.syscalls import SYSCALLS

#: Parameters the transport itself provides (not arguments on the bus).
TRANSPORT_FIELDS = {"stream"}

#: Properties of the manager object: name → D-Bus type.
PROPERTIES = {
    "Version": "s",
    "State": "s",
    "Models": "as",
    "DefaultModel": "s",
    "Running": "u",
    "QueueLength": "u",
}


@dataclass(frozen=True)
class BusMethod:
    """One method on the bus and the syscall it makes."""

    interface: str
    name: str
    syscall: Syscall
    args: tuple[tuple[str, str], ...]  # (name, D-Bus type) of the required parameters
    has_options: bool
    starts_request: bool

    @property
    def in_signature(self) -> str:
        """The method's input signature."""
        return "".join(t for _, t in self.args) + ("a{sv}" if self.has_options else "")

    @property
    def out_signature(self) -> str:
        """The method's output signature."""
        return "o" if self.starts_request else "a{sv}"


#: Every method of a manager object, keyed by (interface, method).
BusMethods = Mapping[tuple[str, str], BusMethod]

#: Built method sets, by the identity of the table's entries.  A set holds its syscalls, so
#: while an entry is here no other object can take one of their ids.
_built: dict[tuple[tuple[str, int], ...], BusMethods] = {}


def bus_methods(table: Mapping[str, Syscall] | None = None) -> BusMethods:
    """Every method of the manager object serving ``table`` (default: the installed one).

    Built once per table and shared: callers only read it.
    """
    syscalls = SYSCALLS if table is None else table
    key = tuple((name, id(spec)) for name, spec in syscalls.items())
    methods = _built.get(key)
    if methods is None:
        methods = _built[key] = _build(syscalls)
    return methods


def _build(table: Mapping[str, Syscall]) -> BusMethods:
    out: dict[tuple[str, str], BusMethod] = {}
    for spec in table.values():
        # Built now, so a result D-Bus cannot carry stops the front-end at its start rather
        # than failing the syscall's first reply.
        struct_codec(spec.result)
        fields = {k: f for k, f in field_codecs(spec.params).items() if k not in TRANSPORT_FIELDS}
        required = tuple(
            (k, f.codec.signature)
            for k, f in fields.items()
            if spec.params.model_fields[k].is_required()
        )
        has_options = len(required) < len(fields)
        iface = names.family_interface(spec.name)
        variants = [(names.method_name(spec.name), False)]
        if spec.streams:
            variants.append((names.start_method_name(spec.name), True))
        for method, starts in variants:
            out[(iface, method)] = BusMethod(iface, method, spec, required, has_options, starts)
    return types.MappingProxyType(out)


#: ``ConfirmationRequested``'s arguments: the request's id, the tool, its arguments (JSON,
#: whole), its annotations, the asking agent ("" for none), when the request expires.
CONFIRMATION_REQUESTED = (
    ("request", "s"),
    ("tool", "s"),
    ("arguments", "s"),
    ("annotations", "a{sb}"),
    ("aid", "s"),
    ("expires", "d"),
)
CONFIRMATION_SIGNATURE = "(" + "".join(t for _, t in CONFIRMATION_REQUESTED) + ")"


def _arg(name: str, sig: str, direction: str | None = None) -> str:
    d = f" direction={quoteattr(direction)}" if direction else ""
    return f"      <arg name={quoteattr(name)} type={quoteattr(sig)}{d}/>"


def manager_xml(table: Mapping[str, Syscall] | None = None) -> str:
    """Introspection XML of the manager object's own interfaces (for ``table``'s syscalls)."""
    by_iface: dict[str, list[BusMethod]] = {}
    for m in bus_methods(table).values():
        by_iface.setdefault(m.interface, []).append(m)
    lines = ["<node>"]
    for iface in sorted(by_iface):
        lines.append(f"  <interface name={quoteattr(iface)}>")
        for m in by_iface[iface]:
            lines.append(f"    <method name={quoteattr(m.name)}>")
            lines.extend(_arg(n, t, "in") for n, t in m.args)
            if m.has_options:
                lines.append(_arg("options", "a{sv}", "in"))
            lines.append(_arg("request" if m.starts_request else "result", m.out_signature, "out"))
            lines.append("    </method>")
        if iface == names.PROPERTIES_INTERFACE:
            for prop, sig in PROPERTIES.items():
                lines.append(
                    f'    <property name={quoteattr(prop)} type={quoteattr(sig)} access="read">'
                )
                lines.append(
                    '      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal"'
                    ' value="true"/>'
                )
                lines.append("    </property>")
        if iface == names.FAMILY_INTERFACES["tool"]:
            lines.append('    <signal name="ConfirmationRequested">')
            lines.extend(_arg(n, t) for n, t in CONFIRMATION_REQUESTED)
            lines.append("    </signal>")
        lines.append("  </interface>")
    lines += [
        f"  <interface name={quoteattr(names.OBJECT_MANAGER)}>",
        '    <method name="GetManagedObjects">',
        _arg("objects", "a{oa{sa{sv}}}", "out"),
        "    </method>",
        '    <signal name="InterfacesAdded">',
        _arg("object", "o"),
        _arg("interfaces", "a{sa{sv}}"),
        "    </signal>",
        '    <signal name="InterfacesRemoved">',
        _arg("object", "o"),
        _arg("interfaces", "as"),
        "    </signal>",
        "  </interface>",
        "</node>",
    ]
    return "\n".join(lines) + "\n"


#: Properties of a request object.
REQUEST_PROPERTIES = {"State": "s", "Syscall": "s"}


def request_xml() -> str:
    """Introspection XML of a request object."""
    lines = [
        "<node>",
        f"  <interface name={quoteattr(names.REQUEST_INTERFACE)}>",
        '    <method name="Cancel"/>',
    ]
    for prop, sig in REQUEST_PROPERTIES.items():
        lines.append(f'    <property name={quoteattr(prop)} type={quoteattr(sig)} access="read"/>')
    lines += [
        '    <signal name="Token">',
        _arg("seq", "t"),
        _arg("content", "s"),
        "    </signal>",
        '    <signal name="Finished">',
        _arg("result", "a{sv}"),
        "    </signal>",
        '    <signal name="Failed">',
        _arg("error", "s"),
        _arg("message", "s"),
        "    </signal>",
        "  </interface>",
        "</node>",
    ]
    return "\n".join(lines) + "\n"


#: Properties of an agent object: name → (D-Bus type, whether it changes).  None of them is
#: ever missing: ``Pid`` is 0 while the agent has no process (D-Bus has no null).
AGENT_PROPERTIES = {
    "Aid": ("s", False),
    "State": ("s", True),
    "Owner": ("s", False),
    "Uid": ("u", False),
    "Pid": ("u", False),
    "Label": ("s", False),
}


def agent_xml() -> str:
    """Introspection XML of an agent object."""
    lines = ["<node>", f"  <interface name={quoteattr(names.AGENT_INTERFACE)}>"]
    for prop, (sig, changes) in AGENT_PROPERTIES.items():
        lines += [
            f'    <property name={quoteattr(prop)} type={quoteattr(sig)} access="read">',
            '      <annotation name="org.freedesktop.DBus.Property.EmitsChangedSignal"'
            f" value={quoteattr('true' if changes else 'const')}/>",
            "    </property>",
        ]
    lines += [
        '    <signal name="StateChanged">',
        _arg("state", "s"),
        _arg("reason", "s"),
        "    </signal>",
        "  </interface>",
        "</node>",
    ]
    return "\n".join(lines) + "\n"


#: The interfaces every object has besides its own, as the D-Bus specification declares them.
_STANDARD_XML = f"""  <interface name="{names.DBUS_INTROSPECTABLE}">
    <method name="Introspect">
      <arg name="xml_data" type="s" direction="out"/>
    </method>
  </interface>
  <interface name="{names.DBUS_PEER}">
    <method name="Ping"/>
    <method name="GetMachineId">
      <arg name="machine_uuid" type="s" direction="out"/>
    </method>
  </interface>
"""
_DOCTYPE = (
    '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
    '                      "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
)


def _inner(xml: str) -> str:
    return xml.removeprefix("<node>\n").removesuffix("</node>\n")


def request_introspection() -> str:
    """What ``Introspect`` gives the owner of a request object: its own interface and the
    standard ones (nobody else can tell the object exists)."""
    return (
        _DOCTYPE
        + "<node>\n"
        + _STANDARD_XML
        + _inner(properties.XML)
        + _inner(request_xml())
        + "</node>\n"
    )


def agent_introspection() -> str:
    """What ``Introspect`` gives those who may see an agent object (its owner, administrators;
    to everyone else there is nothing at its path)."""
    return (
        _DOCTYPE
        + "<node>\n"
        + _STANDARD_XML
        + _inner(properties.XML)
        + _inner(agent_xml())
        + "</node>\n"
    )


if __name__ == "__main__":  # python -m aiosd.api.dbus.introspection: print the XML for docs
    print(manager_xml())
    print(request_xml())
    print(agent_xml())

"""The D-Bus interfaces, generated from the syscall table (so the bus cannot drift from it).

Rule: a syscall ``family.name`` becomes method ``Name`` on interface
``org.aiosd.Daemon1.<Family>``.  Its required parameters are typed arguments in declaration
order; its optional parameters travel in a trailing ``a{sv} options``; the result is an
``a{sv}``.  A streaming syscall also gets ``Start<Name>``, which returns the path of a request
object that emits ``Token`` signals and then ``Finished`` or ``Failed``.
"""

from __future__ import annotations

import enum
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

from pydantic import BaseModel

from aiosd.api.dbus import names
from aiosd.kernel.syscall_base import BusBinary, Syscall
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


def signature_of(annotation: Any) -> str:
    """The D-Bus type of a pydantic field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return signature_of(args[0])
    if origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not type(None)]
        return signature_of(real[0]) if len(real) == 1 else "v"
    if origin is list:
        return "a" + signature_of(args[0])
    if origin is dict:
        return "a{sv}"
    if isinstance(annotation, type):
        if issubclass(annotation, bool):
            return "b"
        if issubclass(annotation, enum.Enum) or issubclass(annotation, str):
            return "s"
        if issubclass(annotation, int):
            return "x"
        if issubclass(annotation, float):
            return "d"
        if issubclass(annotation, BaseModel):
            return "a{sv}"
    return "v"


def _field_signature(field: Any) -> str:
    # pydantic keeps a field's Annotated extras in ``metadata``, not in ``annotation``.
    if any(isinstance(m, BusBinary) for m in field.metadata):
        return "v"  # s (text) or ay (bytes)
    return signature_of(field.annotation)


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


@functools.cache
def bus_methods() -> Mapping[tuple[str, str], BusMethod]:
    """Every method of the manager object, keyed by (interface, method).

    Built once (the syscall table is fixed) and shared: callers only read it.
    """
    out: dict[tuple[str, str], BusMethod] = {}
    for spec in SYSCALLS.values():
        fields = {k: f for k, f in spec.params.model_fields.items() if k not in TRANSPORT_FIELDS}
        required = tuple((k, _field_signature(f)) for k, f in fields.items() if f.is_required())
        has_options = any(not f.is_required() for f in fields.values())
        iface = names.family_interface(spec.name)
        variants = [(names.method_name(spec.name), False)]
        if spec.streams:
            variants.append((names.start_method_name(spec.name), True))
        for method, starts in variants:
            out[(iface, method)] = BusMethod(iface, method, spec, required, has_options, starts)
    return types.MappingProxyType(out)


def _arg(name: str, sig: str, direction: str | None = None) -> str:
    d = f" direction={quoteattr(direction)}" if direction else ""
    return f"      <arg name={quoteattr(name)} type={quoteattr(sig)}{d}/>"


def manager_xml() -> str:
    """Introspection XML of the manager object's own interfaces."""
    by_iface: dict[str, list[BusMethod]] = {}
    for m in bus_methods().values():
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


if __name__ == "__main__":  # python -m aiosd.api.dbus.introspection: print the XML for docs
    print(manager_xml())
    print(request_xml())

"""The D-Bus packaging files agree with the code's names and the systemd unit."""

from __future__ import annotations

import configparser
import xml.etree.ElementTree as ET

from aiosd.api.dbus import names
from aiosd.api.dbus.introspection import bus_methods
from aiosd.kernel.syscalls import SYSCALLS
from tests.support import REPO

DBUS = REPO / "packaging" / "dbus"


def test_policy_lets_only_root_own_the_name_and_everyone_call_it() -> None:
    root = ET.parse(DBUS / "org.aiosd.Daemon1.conf").getroot()
    owners = [
        (p.attrib, a.attrib)
        for p in root.findall("policy")
        for a in p.findall("allow")
        if "own" in a.attrib
    ]
    assert owners == [({"user": "root"}, {"own": names.BUS_NAME})]
    callers = [
        a.attrib
        for p in root.findall("policy")
        if p.get("context") == "default"
        for a in p.findall("allow")
    ]
    assert {"send_destination": names.BUS_NAME} in callers


def test_activation_file_names_the_bus_name_and_the_unit() -> None:
    cp = configparser.ConfigParser()
    cp.read(DBUS / "org.aiosd.Daemon1.service")
    svc = cp["D-BUS Service"]
    assert svc["Name"] == names.BUS_NAME
    unit = svc["SystemdService"]
    assert (REPO / "packaging" / "systemd" / unit).exists()
    assert (
        "Alias=dbus-org.aiosd.Daemon1.service"
        in (REPO / "packaging" / "systemd" / "aiosd.service").read_text()
    )


def test_every_syscall_has_a_bus_method_and_every_family_an_interface() -> None:
    methods = {bm.syscall.name for bm in bus_methods().values()}
    assert methods == set(SYSCALLS)
    for name in SYSCALLS:
        assert names.family_interface(name).startswith(names.INTERFACE_PREFIX)
    streaming = {bm.syscall.name for bm in bus_methods().values() if bm.starts_request}
    assert streaming == {n for n, s in SYSCALLS.items() if s.streams}

"""Agent objects: ``/org/aiosd/Daemon1/agent/AID``, one per live agent.

An agent object has the agent's properties (``State``, ``Owner``, ``Uid``, ``Pid``, ``Label``,
``Aid``) and emits ``StateChanged(state, reason)`` and ``PropertiesChanged`` as the agent
changes; it appears (``InterfacesAdded``) when the agent has started, or when the front-end
starts and finds it running, and disappears (``InterfacesRemoved``) once it has ended, after
the ``StateChanged`` of its end.  Ended agents stay readable with ``Agent.Info`` and
``Agent.List``.

Only its owner (with a role) and administrators may see it: to every other connection it does
not exist.  Like request objects it is registered nowhere with GDBus: the front-end answers the
calls of those who may see it (:func:`handle`), and GDBus everyone else's, as for a path where
nothing is.  Its signals are unicast to each connection of the owner's and of administrators
that the front-end knows, never broadcast (see :mod:`aiosd.api.dbus.service`).

The table of objects is written on the event loop (where the agent manager tells of changes),
before the change is answered, so that a client that has its ``Spawn`` answer finds the object;
each entry is an immutable :class:`AgentView`, replaced whole, so the GLib thread and the
message filter read a consistent one without a lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gi.repository import GLib

from aiosd.api.dbus import names, properties
from aiosd.api.dbus.introspection import AGENT_PROPERTIES, agent_introspection
from aiosd.kernel.agents import Agent

if TYPE_CHECKING:
    from aiosd.api.dbus.calls import BusCall

_INTROSPECTION = GLib.Variant("(s)", (agent_introspection(),))
#: What those who may see an agent object may call on it, and each method's argument signature.
_METHODS = {
    (names.DBUS_INTROSPECTABLE, "Introspect"): "",
    **{(names.DBUS_PROPERTIES, m): sig for m, sig in properties.SIGNATURES.items()},
}


@dataclass(frozen=True)
class AgentView:
    """What the bus shows of an agent at one moment."""

    aid: str
    uid: int
    user: str
    pid: int
    label: str
    state: str
    #: Why it is in this state, where the daemon knows: the stop under way, how it ended.
    reason: str
    live: bool

    @classmethod
    def of(cls, a: Agent) -> AgentView:
        """The view of ``a`` now."""
        if a.live:
            reason = (a.stop_reason or "") if a.state == "stopping" else ""
        else:
            reason = a.reason
        return cls(a.aid, a.uid, a.user, a.pid or 0, a.label, a.state, reason, a.live)

    @property
    def path(self) -> str:
        """Its object path."""
        return names.agent_path(self.aid)

    def properties(self) -> dict[str, GLib.Variant]:
        """The agent interface's properties."""
        values: dict[str, object] = {
            "Aid": self.aid,
            "State": self.state,
            "Owner": self.user,
            "Uid": self.uid,
            "Pid": self.pid,
            "Label": self.label,
        }
        return {k: GLib.Variant(AGENT_PROPERTIES[k][0], values[k]) for k in AGENT_PROPERTIES}


@dataclass(frozen=True)
class Signal:
    """A signal to send to those who may see an agent."""

    path: str
    interface: str
    name: str
    args: GLib.Variant


class AgentObjects:
    """The live agents' objects, by path."""

    def __init__(self) -> None:
        #: Written on the event loop only; read from any thread (one ``get`` or one copy).
        self.by_path: dict[str, AgentView] = {}

    def get(self, path: str) -> AgentView | None:
        """The object at ``path``, if there is one."""
        return self.by_path.get(path)

    def views(self) -> list[AgentView]:
        """Every object."""
        return list(self.by_path.values())

    def clear(self) -> None:
        """Forget every object (the front-end is closing)."""
        self.by_path = {}

    def update(self, a: Agent) -> tuple[AgentView, list[Signal]]:
        """Take the agent's new state (on the event loop); the signals that tell of it."""
        view = AgentView.of(a)
        path = view.path
        old = self.by_path.get(path)
        if view.live:
            self.by_path[path] = view
        elif old is not None:
            del self.by_path[path]
        if old is None:
            if not view.live:
                return view, []  # it never had an object (it ended before one was made)
            added = GLib.Variant("(oa{sa{sv}})", (path, {names.AGENT_INTERFACE: view.properties()}))
            return view, [Signal(names.OBJECT_PATH, names.OBJECT_MANAGER, "InterfacesAdded", added)]
        out = [] if old.state == view.state else [_state_changed(view), _properties_changed(view)]
        if not view.live:
            removed = GLib.Variant("(oas)", (path, [names.AGENT_INTERFACE]))
            out.append(
                Signal(names.OBJECT_PATH, names.OBJECT_MANAGER, "InterfacesRemoved", removed)
            )
        return view, out


def _state_changed(view: AgentView) -> Signal:
    args = GLib.Variant("(ss)", (view.state, view.reason))
    return Signal(view.path, names.AGENT_INTERFACE, "StateChanged", args)


def _properties_changed(view: AgentView) -> Signal:
    changed = {"State": GLib.Variant("s", view.state)}
    args = GLib.Variant("(sa{sv}as)", (names.AGENT_INTERFACE, changed, []))
    return Signal(view.path, names.DBUS_PROPERTIES, "PropertiesChanged", args)


def handle(call: BusCall, view: AgentView) -> None:
    """Answer a call on an agent object from someone who may see it."""
    signature = _METHODS.get((call.interface or "", call.member))
    if signature is None:
        call.return_dbus_error(
            names.DBUS_UNKNOWN_METHOD, f"no method {call.interface}.{call.member} on {view.path}"
        )
    elif not call.checked(signature):
        return
    elif call.interface == names.DBUS_INTROSPECTABLE:
        call.return_value(_INTROSPECTION)
    else:
        properties.answer(
            call, call.member, call.params, {names.AGENT_INTERFACE: view.properties()}
        )

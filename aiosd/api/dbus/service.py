"""The D-Bus front-end: ``org.aiosd.Daemon1`` on the system bus (or another bus).

Threads: GLib's main loop runs in its own thread and receives every bus call.  A call hops to
the asyncio kernel with ``run_coroutine_threadsafe`` and its reply is sent from the future's
completion callback (sending a message is thread-safe), so neither side ever waits for the
other.  pydbus opens the connection and owns the name.

Calls arrive through the connection's message filter, which takes every call to aiosd's
objects before GDBus would dispatch it and hands it to the GLib thread (:mod:`.calls`).  GDBus
answers only what holds nothing of anyone's: ``Introspect`` and ``Peer`` on the manager
object (registered with GDBus, with no handler, for that alone), and every call to a path
where nothing is that the caller may see, which is where another connection's request
objects and other users' agent objects are: those are registered nowhere, so no one else can
tell them from nothing.
Nothing goes through GLib's closure-based registration, which keeps every call's invocation
alive for good (:mod:`.calls`).

What a client can make the daemon hold is bounded per user (:mod:`.limits`); callers with no
role get the manager's introspection and nothing else.

Identity comes from the bus (``GetConnectionCredentials``: uid, pid, groups) and becomes the
same :class:`Caller` the socket builds from SO_PEERCRED.  Signals that carry a user's data
(tokens, results, request objects appearing) are unicast to the requesting connection.

Agent objects (:mod:`.agents`) are seen by their owner and administrators only.  Whose a
connection is, the front-end knows once it has answered a call of it (the credentials it
looked up then, kept per sender): an agent's signals are unicast to each such connection of
its owner's uid and of administrators.  A call on an agent's path from a connection not known
yet is taken, whether or not an object is there, and decided once its credentials are known;
a caller who may not see what is there gets exactly GDBus's answer for a path where nothing is
(the front-end asks GDBus itself, with the same call sent to its own connection).

If the bus goes away, the daemon keeps serving its socket and reconnects with backoff, then
registers its objects and owns its name again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import pydbus
from gi.repository import Gio, GLib

from aiosd import __version__
from aiosd.api.dbus import agents, introspection, names, properties
from aiosd.api.dbus.calls import BusCall
from aiosd.api.dbus.codec import params_from_bus, result_body
from aiosd.api.dbus.introspection import (
    PROPERTIES,
    TRANSPORT_FIELDS,
    BusMethod,
    bus_methods,
    manager_xml,
)
from aiosd.api.dbus.limits import CallLimits
from aiosd.api.dbus.requests import RequestObject
from aiosd.config import DBusConfig
from aiosd.errors import AiosError, BackendUnavailable, InternalError, InvalidParams, ShuttingDown
from aiosd.kernel.agents import Agent
from aiosd.kernel.kernel import Kernel
from aiosd.kernel.syscall_base import Emit
from aiosd.managers.access import Caller, Role
from aiosd.managers.tools import Pending
from aiosd.managers.users import process_ids

log = logging.getLogger(__name__)

T = TypeVar("T")

CREDENTIALS_CACHE = 4096
RECONNECT_FIRST, RECONNECT_MAX = 0.5, 10.0


def bus_address(bus: str) -> str:
    """The address of ``system``, ``session`` or an explicit address."""
    if bus == "system":
        return names.system_bus_address()
    if bus == "session":
        address = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
        if not address:
            raise BackendUnavailable("dbus.bus = 'session' but DBUS_SESSION_BUS_ADDRESS is unset")
        return address
    return bus


class DBusFrontend:
    """Owns the bus connection, the manager object and the request objects."""

    def __init__(self, kernel: Kernel, cfg: DBusConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.kernel = kernel
        self.loop = loop
        self.cfg = cfg
        self.address = bus_address(cfg.bus)
        self.connected = False
        self._bus: Any = None
        self._registrations: list[int] = []
        self._filter: int | None = None
        self.limits = CallLimits(cfg)
        self._methods = bus_methods(kernel.syscalls)
        self._node = Gio.DBusNodeInfo.new_for_xml(manager_xml(kernel.syscalls))
        #: The manager's interfaces, none with properties but the one that has them.
        self._interfaces = frozenset(i.name for i in self._node.interfaces)
        self._mainloop = GLib.MainLoop()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._accepting = True
        self._callers: OrderedDict[str, Caller] = OrderedDict()
        #: Calls waiting for their sender's credentials, by sender (one look-up each).
        self._waiting: dict[str, list[tuple[BusCall, Callable[[Caller], None]]]] = {}
        self._inflight: dict[str, set[concurrent.futures.Future[Any]]] = {}
        self.requests: dict[str, RequestObject] = {}
        self.agent_objects = agents.AgentObjects()
        #: Replaced whole (never changed in place) by the asyncio thread; the GLib thread reads
        #: it once per call, so it always sees one consistent set.
        self._props: dict[str, object] = {}
        self._props_pending = False

    # --- lifecycle (asyncio side) ---------------------------------------------------------

    async def start(self) -> None:
        """Connect, register, own the name; return only when the name is ours."""
        self._thread = threading.Thread(target=self._mainloop.run, name="glib", daemon=True)
        self._thread.start()
        self._refresh_properties(emit=False)
        # The agents running now have their objects before the name is ours; from here on the
        # manager tells of every change (nothing runs on the loop in between).
        for a in self.kernel.agents.visible(0, admin=True):
            if a.live:
                self.agent_objects.update(a)
        self.kernel.agents.listeners.append(self._agent_changed)
        self.kernel.tools.on_confirmation.append(self._confirmation)
        try:
            await asyncio.wrap_future(self._in_glib(self._connect))
        except GLib.Error as exc:
            self._unlisten()
            await self._halt()
            raise BackendUnavailable(
                f"cannot use the D-Bus bus at {self.address}: {exc.message}; start the bus "
                "(systemctl start dbus), or run aiosd with --no-dbus"
            ) from None
        except Exception:
            self._unlisten()
            await self._halt()
            raise
        self.kernel.listeners.append(self._kernel_changed)
        log.info("D-Bus: %s on %s", names.BUS_NAME, self.address)

    async def stop_accepting(self) -> None:
        """Release the name: new calls fail at the bus; running ones still get answers."""
        self._accepting = False
        await asyncio.wrap_future(self._in_glib(self._release_name))

    async def close(self) -> None:
        """Cancel what is left, unregister everything, close the connection."""
        self._stopping = True
        if self._kernel_changed in self.kernel.listeners:
            self.kernel.listeners.remove(self._kernel_changed)
        self._unlisten()
        await asyncio.wrap_future(self._in_glib(self._teardown))
        await self._halt()
        self.agent_objects.clear()

    def _unlisten(self) -> None:
        if self._confirmation in self.kernel.tools.on_confirmation:
            self.kernel.tools.on_confirmation.remove(self._confirmation)
        if self._agent_changed in self.kernel.agents.listeners:
            self.kernel.agents.listeners.remove(self._agent_changed)

    def pending(self) -> list[str]:
        """What is still running for bus clients, by sender, for a stop that waits on it."""
        return sorted(
            f"{sender} ({len(futs)} call(s))"
            for sender, futs in list(self._inflight.items())
            if futs
        )

    async def _halt(self) -> None:
        self._mainloop.quit()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)

    def _in_glib(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` in the GLib thread; its outcome arrives in the returned future."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> bool:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the waiting side
                fut.set_exception(exc)
            return False

        GLib.idle_add(run)
        return fut

    # --- connection (GLib thread) ---------------------------------------------------------

    def _connect(self) -> None:
        bus = pydbus.connect(self.address)
        con = bus.con
        con.set_exit_on_close(False)
        try:
            filter_id = con.add_filter(self._take)
            # For GDBus's own introspection of the object (and of its parents) alone: every
            # other call to it is taken by the filter first, so none needs a handler.
            regs = [
                con.register_object(names.OBJECT_PATH, iface, None, None, None)
                for iface in self._node.interfaces
            ]
            flags = 4  # DBUS_NAME_FLAG_DO_NOT_QUEUE: fail rather than wait in line
            reply = bus.dbus.RequestName(names.BUS_NAME, flags)
            if reply != 1:
                raise BackendUnavailable(
                    f"{names.BUS_NAME} is already owned by another process on {self.address}"
                )
        except BaseException:
            con.close_sync(None)
            raise
        con.signal_subscribe(
            "org.freedesktop.DBus",
            "org.freedesktop.DBus",
            "NameOwnerChanged",
            "/org/freedesktop/DBus",
            None,
            Gio.DBusSignalFlags.NONE,
            self._on_name_owner,
            None,
        )
        con.connect("closed", self._on_closed)
        self._bus, self._registrations, self._filter = bus, regs, filter_id
        self.connected = True

    def _release_name(self) -> None:
        if self.connected:
            try:
                self._bus.dbus.ReleaseName(names.BUS_NAME)
            except GLib.Error as exc:
                log.warning("D-Bus: releasing %s failed: %s", names.BUS_NAME, exc.message)

    def _teardown(self) -> None:
        for req in list(self.requests.values()):
            req.cancel()
        if self.connected:
            con = self._bus.con
            if self._filter is not None:
                con.remove_filter(self._filter)
            for reg in self._registrations:
                con.unregister_object(reg)
            con.flush_sync(None)
            con.close_sync(None)
        self.connected = False

    def _on_closed(self, con: Gio.DBusConnection, vanished: bool, error: GLib.Error | None) -> None:
        if self._stopping or self._bus is None or con is not self._bus.con:
            return
        self.connected = False
        self._registrations, self._filter = [], None
        self._callers.clear()
        self._waiting.clear()  # their look-ups fail with the connection, and answer them
        # Every client was on that bus: nobody is left to receive their requests' signals.
        # Cancel all their work, request objects included. Future.cancel() runs done
        # callbacks at once (they discard from these sets): copy.
        inflight, self._inflight = self._inflight, {}
        for futures in inflight.values():
            for fut in list(futures):
                fut.cancel()
        log.warning(
            "D-Bus: lost the connection to %s (%s); reconnecting",
            self.address,
            error.message if error else "closed",
        )
        GLib.timeout_add(int(RECONNECT_FIRST * 1000), self._reconnect, RECONNECT_FIRST)

    def _reconnect(self, delay: float) -> bool:
        if self._stopping:
            return False
        try:
            self._connect()
        except Exception as exc:
            nxt = min(delay * 2, RECONNECT_MAX)
            log.debug("D-Bus: reconnect failed (%s); next try in %.1fs", exc, nxt)
            GLib.timeout_add(int(nxt * 1000), self._reconnect, nxt)
            return False
        log.info("D-Bus: reconnected to %s; %s is ours again", self.address, names.BUS_NAME)
        return False

    def _on_name_owner(
        self,
        con: Any,
        sender: str,
        path: str,
        iface: str,
        signal: str,
        params: GLib.Variant,
        _data: Any,
    ) -> None:
        name, _old, new = params.unpack()
        if new or not name.startswith(":"):
            return
        # A client left the bus: forget it and cancel its work, as the socket does at EOF.
        caller = self._callers.pop(name, None)
        if caller is not None:
            asyncio.run_coroutine_threadsafe(self.kernel.session_closed(caller), self.loop)
        # Its request objects' futures are among these (_syscall submits them).
        for fut in list(self._inflight.pop(name, set())):
            fut.cancel()

    # --- calls ---------------------------------------------------------------------------

    def _take(
        self, con: Gio.DBusConnection, message: Gio.DBusMessage, incoming: bool, *_data: Any
    ) -> Gio.DBusMessage | None:
        """The message filter (GDBus's worker thread): take the calls that are aiosd's to
        answer, hand them to the GLib thread, and let GDBus have every other message."""
        try:
            if not incoming or message.get_message_type() != Gio.DBusMessageType.METHOD_CALL:
                return message
            path, iface = message.get_path(), message.get_interface()
            if iface == names.DBUS_PEER:
                return message  # answered alike on every path, by GDBus
            if path == names.OBJECT_PATH:
                if iface == names.DBUS_INTROSPECTABLE:
                    return message
            elif path is not None and path.startswith(names.REQUEST_PATH_PREFIX + "/"):
                req = self.requests.get(path)
                if req is None or req.owner != message.get_sender():
                    return message  # to GDBus, as for any path where nothing is
            elif path is not None and path.startswith(names.AGENT_PATH_PREFIX + "/"):
                sender = message.get_sender()
                if sender is None or sender == con.get_unique_name():
                    return message  # the front-end's own question: what GDBus answers here
                caller = self._callers.get(sender)  # one get: safe beside the GLib thread
                if caller is not None:
                    view = self.agent_objects.get(path)
                    if view is None or not self._may_see(caller, view.uid):
                        return message  # to GDBus, as for any path where nothing is
                # A sender not known yet: taken whether or not an object is there (the same
                # work, the same time either way), and decided once its credentials are known.
            else:
                return message
            GLib.idle_add(self._on_message, con, message, priority=GLib.PRIORITY_DEFAULT)
            return None
        except Exception:  # never lose a message: GDBus answers what this could not take
            return message

    def _on_message(self, con: Gio.DBusConnection, message: Gio.DBusMessage) -> bool:
        call = BusCall(con, message, self.cfg.max_message_bytes)
        try:
            if call.path == names.OBJECT_PATH:
                self._manager_call(call)
            elif call.path.startswith(names.AGENT_PATH_PREFIX + "/"):
                self._agent_call(call)
            else:
                self._request_call(call)
        except Exception as exc:
            _return_error(call, exc, "D-Bus call %s.%s failed", call.interface, call.member)
        return False

    def _manager_call(self, call: BusCall) -> None:
        iface, member = call.interface, call.member
        bm = self._methods.get((iface or "", member))
        if iface is None:
            call.return_dbus_error(
                names.DBUS_UNKNOWN_METHOD, f"no method {member}: aiosd's methods need an interface"
            )
        elif bm is not None:
            if call.checked(bm.in_signature):
                self._syscall(call, bm)
        elif iface == names.DBUS_PROPERTIES and member in properties.SIGNATURES:
            if call.checked(properties.SIGNATURES[member]):
                self._with_role(call, lambda _caller: self._properties_call(call))
        elif iface == names.OBJECT_MANAGER and member == "GetManagedObjects":
            if call.checked(""):
                self._with_role(call, lambda caller: self._managed_objects(call, caller))
        elif iface in self._interfaces or iface in (names.DBUS_PROPERTIES, names.OBJECT_MANAGER):
            call.return_dbus_error(names.DBUS_UNKNOWN_METHOD, f"no method {iface}.{member}")
        else:
            call.return_dbus_error(
                names.DBUS_UNKNOWN_METHOD, f"no interface {iface} on {names.OBJECT_PATH}"
            )

    def _request_call(self, call: BusCall) -> None:
        req = self.requests.get(call.path)
        if req is None or req.owner != call.sender:
            # It ended after the filter took the call: only its owner can be told so.
            call.return_dbus_error(names.DBUS_UNKNOWN_OBJECT, f"no object at {call.path}")
            return
        req.handle(call)

    def _agent_call(self, call: BusCall) -> None:
        def answer(caller: Caller) -> None:
            view = self.agent_objects.get(call.path)
            if view is None or not self._may_see(caller, view.uid):
                self._as_if_nothing(call)
            else:
                agents.handle(call, view)

        self._with_caller(call, answer)

    def _may_see(self, caller: Caller, uid: int) -> bool:
        """Whether ``caller`` may see an agent of ``uid``'s (its owner with a role, or an
        administrator): as the agent.* syscalls decide."""
        role = self.kernel.access.role(caller)
        return role is Role.admin or (role is Role.user and caller.uid == uid)

    def _as_if_nothing(self, call: BusCall) -> None:
        """Answer ``call`` exactly as GDBus answers it at a path where nothing is: ask GDBus,
        with the same call sent to the daemon's own connection (the filter lets it through)."""
        if call.message.get_flags() & Gio.DBusMessageFlags.NO_REPLY_EXPECTED:
            call.return_value(None)  # nothing is sent
            return
        con = call.con
        question = Gio.DBusMessage.new_method_call(
            con.get_unique_name(), call.path, call.interface, call.member
        )
        if call.message.get_body() is not None:
            question.set_body(call.message.get_body())

        def answered(con: Gio.DBusConnection, result: Gio.AsyncResult, _data: Any = None) -> None:
            try:
                reply = con.send_message_with_reply_finish(result)
            except GLib.Error as exc:
                log.debug("D-Bus: no answer from GDBus for %s: %s", call.path, exc.message)
                call.return_dbus_error(names.DBUS_UNKNOWN_METHOD, f"no object at {call.path}")
                return
            body = reply.get_body()
            if reply.get_message_type() == Gio.DBusMessageType.ERROR:
                text = body.get_child_value(0).get_string() if body is not None else ""
                call.return_dbus_error(reply.get_error_name() or names.DBUS_UNKNOWN_METHOD, text)
            else:
                call.return_value(body)

        con.send_message_with_reply(
            question, Gio.DBusSendMessageFlags.NONE, -1, None, answered, None
        )

    def _syscall(self, call: BusCall, bm: BusMethod) -> None:
        if not self._accepting:
            raise ShuttingDown("the daemon is stopping and takes no new requests")

        def dispatch(caller: Caller) -> None:
            role = self.kernel.access.role(caller)
            refused = self.limits.admit(caller.uid, role is Role.admin)
            if refused is not None:
                raise refused
            try:
                admitted(caller, role)
            except BaseException:
                self.limits.release(caller.uid)
                raise

        def admitted(caller: Caller, role: Role) -> None:
            # A caller with no role learns nothing, not even what is wrong with its arguments:
            # the kernel refuses it (and audits that) before it looks at any.
            params = {} if role is Role.none else _params(call, bm)
            if bm.starts_request:
                # Random, not counted: a count would tell everyone how much others ask.
                path = f"{names.REQUEST_PATH_PREFIX}/{secrets.token_hex(8)}"
                req = RequestObject(
                    self.forget, call.con, path, call.sender, bm.syscall, self.cfg.max_message_bytes
                )
                req.future = self._submit(
                    call, caller, self._started(call, bm, params, caller, req)
                )
                req.future.add_done_callback(lambda _f: _unanswered(call))
            else:
                work = _dispatched(self.kernel, bm.syscall.name, params, caller)
                fut = self._submit(call, caller, work)
                fut.add_done_callback(lambda f: _reply(call, f, bm, self.cfg.max_message_bytes))

        self._with_caller(call, dispatch)

    def _submit(
        self, call: BusCall, caller: Caller, coro: Coroutine[Any, Any, T]
    ) -> concurrent.futures.Future[T]:
        """Run an admitted call's work on the event loop; it counts as in flight until done."""
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        except BaseException:
            coro.close()
            raise
        bucket = self._inflight.setdefault(call.sender, set())
        bucket.add(fut)
        fut.add_done_callback(bucket.discard)
        fut.add_done_callback(lambda _f: self.limits.release(caller.uid))
        return fut

    async def _started(
        self,
        call: BusCall,
        bm: BusMethod,
        params: dict[str, Any],
        caller: Caller,
        req: RequestObject,
    ) -> None:
        """``Start<Name>`` on the event loop: a call the kernel refuses is answered with its
        error (no request object is made); else with the path of the request, which then
        runs until it has ended."""
        try:
            work = self.kernel.dispatch(bm.syscall.name, params, caller, req.emit_token)
        except Exception as exc:
            _return_error(call, exc, "D-Bus call %s failed", bm.name)
            return
        self.requests[req.path] = req
        call.return_value(GLib.Variant("(o)", (req.path,)))
        req.announce()
        await req.run(work)

    def forget(self, req: RequestObject) -> None:
        """A request object is gone (called on the event loop's thread, where it ended)."""
        self.requests.pop(req.path, None)

    def _with_role(self, call: BusCall, then: Callable[[Caller], None]) -> None:
        """``then(caller)`` for a caller with a role; PermissionDenied for anyone else."""

        def checked(caller: Caller) -> None:
            if self.kernel.access.role(caller) is Role.none:
                raise self.kernel.access.refusal(caller)
            then(caller)

        self._with_caller(call, checked)

    def _with_caller(self, call: BusCall, then: Callable[[Caller], None]) -> None:
        """``then(caller)`` once the sender's credentials are known (an error it raises is
        the call's answer)."""
        sender = call.sender
        cached = self._callers.get(sender)
        if cached is not None:
            self._callers.move_to_end(sender)
            then(cached)
            return
        waiting = self._waiting.get(sender)
        if waiting is not None:  # asked already: one answer serves them all
            waiting.append((call, then))
            return
        waiters = self._waiting[sender] = [(call, then)]

        def done(con: Gio.DBusConnection, result: Gio.AsyncResult, _data: Any = None) -> None:
            # Only this look-up's own: a bus that came back may have given the name anew.
            if self._waiting.get(sender) is waiters:
                del self._waiting[sender]
            try:
                creds = con.call_finish(result).unpack()[0]
                caller = _caller_from(creds, sender, self.kernel.agents.identify)
            except Exception as exc:
                log.warning("D-Bus: cannot get the credentials of %s: %s", sender, exc)
                for waiter, _then in waiters:
                    waiter.return_dbus_error(
                        names.DBUS_ACCESS_DENIED, "cannot establish the caller's identity"
                    )
                return
            self._callers[sender] = caller
            if len(self._callers) > CREDENTIALS_CACHE:
                self._callers.popitem(last=False)
            for waiter, then_ in waiters:
                try:
                    then_(caller)
                except Exception as exc:
                    _return_error(waiter, exc, "D-Bus call from %s failed", sender)

        self._bus.con.call(
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetConnectionCredentials",
            GLib.Variant("(s)", (sender,)),
            GLib.VariantType.new("(a{sv})"),
            Gio.DBusCallFlags.NONE,
            -1,
            None,
            done,
            None,
        )

    def _properties_call(self, call: BusCall) -> None:
        typed = _typed(self._props)
        interfaces = {
            iface: typed if iface == names.PROPERTIES_INTERFACE else {}
            for iface in self._interfaces
        }
        properties.answer(call, call.member, call.params, interfaces)

    def _managed_objects(self, call: BusCall, caller: Caller) -> None:
        # Only the caller's own requests and the agents it may see: other users' work is not
        # theirs to see.
        objects = {
            path: {names.REQUEST_INTERFACE: req.properties()}
            for path, req in list(self.requests.items())
            if req.owner == call.sender
        }
        for view in self.agent_objects.views():
            if self._may_see(caller, view.uid):
                objects[view.path] = {names.AGENT_INTERFACE: view.properties()}
        call.return_value(GLib.Variant("(a{oa{sa{sv}}})", (objects,)))

    # --- agents (asyncio side, then the GLib thread) --------------------------------------

    def _agent_changed(self, agent: Agent) -> None:
        """The agent manager's listener (event loop): the object changes at once, before
        the call that changed it is answered; its signals leave from the GLib thread, where
        the connections the front-end knows are kept."""
        view, signals = self.agent_objects.update(agent)
        if signals:
            GLib.idle_add(
                self._send_agent_signals, view.uid, signals, priority=GLib.PRIORITY_DEFAULT
            )

    def _send_agent_signals(self, uid: int, signals: list[agents.Signal]) -> bool:
        """Unicast an agent's signals to each known connection that may see it (GLib thread)."""
        if not self.connected:
            return False
        con = self._bus.con
        audience = [sender for sender, c in self._callers.items() if self._may_see(c, uid)]
        for sig in signals:
            for sender in audience:
                try:
                    con.emit_signal(sender, sig.path, sig.interface, sig.name, sig.args)
                except GLib.Error as exc:  # the bus went away: nobody to tell
                    log.debug("signal %s.%s not sent: %s", sig.interface, sig.name, exc.message)
        return False

    # --- confirmation requests (asyncio side, then the GLib thread) ------------------------

    def _confirmation(self, p: Pending) -> None:
        """The tool manager's listener: a call of ``p.uid``'s waits for their yes.  The
        request goes to each known connection of that user's (their desktop answers it with
        ``Tool.Confirm``), and to nobody else: not administrators, never broadcast."""
        args = GLib.Variant(
            introspection.CONFIRMATION_SIGNATURE,
            (
                p.id,
                p.tool,
                json.dumps(p.arguments, ensure_ascii=False),
                p.annotations,
                p.aid or "",
                p.expires,
            ),
        )
        GLib.idle_add(self._send_confirmation, p.uid, args, priority=GLib.PRIORITY_DEFAULT)

    def _send_confirmation(self, uid: int, args: GLib.Variant) -> bool:
        if not self.connected:
            return False
        for sender, c in list(self._callers.items()):
            if c.uid != uid:
                continue
            try:
                self._bus.con.emit_signal(
                    sender,
                    names.OBJECT_PATH,
                    names.FAMILY_INTERFACES["tool"],
                    "ConfirmationRequested",
                    args,
                )
            except GLib.Error as exc:  # the bus went away: nobody to tell
                log.debug("ConfirmationRequested not sent: %s", exc.message)
        return False

    # --- properties (asyncio side) --------------------------------------------------------

    def _kernel_changed(self) -> None:
        if not self._props_pending:
            self._props_pending = True
            self.loop.call_soon(self._refresh_properties)

    def _refresh_properties(self, emit: bool = True) -> None:
        self._props_pending = False
        running, waiting = self.kernel.scheduler.totals()
        new = {
            "Version": __version__,
            "State": self.kernel.state,
            "Models": list(self.kernel.backends),
            "DefaultModel": self.kernel.config.llm.default_model,
            "Running": running,
            "QueueLength": waiting,
        }
        changed = {k: v for k, v in new.items() if self._props.get(k) != v}
        self._props = new
        if emit and changed and self.connected:
            self._bus.con.emit_signal(
                None,
                names.OBJECT_PATH,
                names.DBUS_PROPERTIES,
                "PropertiesChanged",
                GLib.Variant("(sa{sv}as)", (names.PROPERTIES_INTERFACE, _typed(changed), [])),
            )


def _params(call: BusCall, bm: BusMethod) -> dict[str, Any]:
    """A syscall method's arguments as the syscall's params."""
    required = [name for name, _ in bm.args]
    params, option_keys = params_from_bus(bm.syscall.params, call.params, required, bm.has_options)
    for key in option_keys:
        if key in TRANSPORT_FIELDS or key in required:
            raise InvalidParams(
                f"invalid params: options.{key}: not an option on D-Bus"
                + (
                    f"; call Start{bm.name} to stream"
                    if key == "stream" and bm.syscall.streams and not bm.starts_request
                    else ""
                ),
                data={"errors": [{"field": f"options.{key}", "message": "not allowed"}]},
            )
    if bm.syscall.streams:
        params["stream"] = bm.starts_request
    return params


async def _dispatched(
    kernel: Kernel, name: str, params: dict[str, Any], caller: Caller, emit: Emit | None = None
) -> dict[str, Any]:
    """The kernel's dispatch, as a coroutine the GLib thread can hand to the event loop."""
    return await kernel.dispatch(name, params, caller, emit)


def _typed(props: Mapping[str, object]) -> dict[str, GLib.Variant]:
    return {k: GLib.Variant(PROPERTIES[k], v) for k, v in props.items()}


#: The primary gid of a caller the bus gives no group for: no group has it, so it grants
#: nothing (Caller.in_group, storage's share look-ups).
NO_GID = -1


def _caller_from(
    creds: Mapping[str, Any], sender: str, identify: Callable[[int, int], str | None]
) -> Caller:
    """The caller a bus connection's credentials (``GetConnectionCredentials``) stand for;
    ``identify(pid, uid)`` is the agent the connecting process is part of, if any."""
    uid = int(creds["UnixUserID"])
    pid = int(creds.get("ProcessID", 0))
    groups = frozenset(int(g) for g in creds.get("UnixGroupIDs", []))
    # The bus gives no primary gid: the process's own, from /proc (never NSS, which may be
    # LDAP over the network, in the thread that serves every bus client), and only while
    # that pid still runs as the bus's uid, since it may have been reused by another process.
    ids = process_ids(pid) if pid > 0 else None
    gid = ids.gid if ids is not None and ids.uids == (uid, uid) else None
    if gid is None:
        gid = min(groups) if groups else NO_GID
    return Caller(
        uid=uid,
        gid=gid,
        pid=pid,
        groups=groups,
        session=f"bus{sender.replace(':', '-')}",
        aid=identify(pid, uid) if pid > 0 else None,
    )


def _reply(
    call: BusCall,
    fut: concurrent.futures.Future[dict[str, Any]],
    bm: BusMethod,
    max_bytes: int,
) -> None:
    try:
        call.return_value(result_body(bm.syscall.result, fut.result(), max_bytes))
    except concurrent.futures.CancelledError:
        _return_error(call, ShuttingDown("the request was cancelled before it finished"))
    except Exception as exc:
        _return_error(call, exc, "D-Bus reply of %s failed", bm.syscall.name)


def _unanswered(call: BusCall) -> None:
    """A call whose work ended (cancelled before it started) without answering it."""
    if not call.answered:
        _return_error(call, ShuttingDown("the request was cancelled before it started"))


def _return_error(
    invocation: BusCall,
    exc: BaseException,
    log_msg: str = "D-Bus call failed",
    *log_args: Any,
) -> None:
    """Answer a call with its AiosError; anything else is logged (``log_msg``) and answered
    as an internal error."""
    if isinstance(exc, AiosError):
        invocation.return_dbus_error(exc.dbus_name, exc.message)
        return
    # stacklevel: the record names the function that caught it, not this helper.
    log.error(log_msg, *log_args, exc_info=exc, stacklevel=2)
    invocation.return_dbus_error(InternalError.dbus_name, "internal error")

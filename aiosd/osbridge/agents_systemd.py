"""The systemd backend: one transient unit per agent, ``aiosd-agent-<aid>.service``.

Each agent is a transient service that systemd starts on the daemon's request
(``StartTransientUnit`` on the system bus) in ``aiosd-agents.slice``: systemd becomes the
user (``User=``, ``Group=``, the user's groups as ``initgroups`` gives them, no capabilities,
no new privileges), enters the working directory, and puts every process of the agent in
the unit's cgroup, which no process of the agent can leave.  So, unlike the subprocess
backend, the kernel bounds what an agent uses (``MemoryMax=``: the OOM killer ends it;
``TasksMax=``: a fork over the limit fails; ``CPUWeight=``; ``RuntimeMaxSec=``), a signal
reaches every process of the agent (``KillUnit``), suspending freezes the cgroup
(``FreezeUnit``), and the agent is known from its cgroup alone (:meth:`identify`).  Agents
are not children of the daemon: they outlive a daemon that stops or dies, and the next one
takes them over (:meth:`SystemdBackend.open`).

The unit is ``Type=exec``: its start job is done once the program has been executed, so a
program that cannot start (not executable by the user, a working directory the user cannot
enter) makes :meth:`SystemdBackend.launch` fail, as it does in the subprocess backend.  It is
``CollectMode=inactive-or-failed``: systemd forgets it as soon as it has ended, so nothing of
ended agents piles up in systemd; how the agent ended (``ExecMainCode``, ``ExecMainStatus``,
``Result``) is therefore taken from the ``PropertiesChanged`` signals systemd sends while the
unit still exists: it sends the service's properties before the unit's ``ActiveState``, so
when ``ActiveState`` says the unit is inactive or failed, its final exit status is known.

stdout and stderr go to the journal, with ``AIOSD_AGENT_ID=<aid>`` on every entry
(``LogExtraFields=``).  Both are one stream there (systemd gives the program a single
journal connection for both when both go to the journal), so every line is reported as
``stdout``.  Lines are read back by the trusted ``_SYSTEMD_UNIT`` field, which only journald
sets (an ``AIOSD_AGENT_ID`` field alone could be forged by anyone who writes to the journal).
How much is kept is journald's business (``SystemMaxUse=``, rate limits), not
``agents.log_max_bytes``.

Threads: the bus connection is the backend's own, with its own GLib main context, run in a
thread of its own ("systemd-bus"); every call is made from that thread and every reply and
signal arrives there, and is handed to the event loop with ``call_soon_threadsafe``.  Journal
reads run in worker threads.  Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import shlex
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from gi.repository import Gio, GLib

from aiosd.config import AgentsConfig
from aiosd.errors import BackendUnavailable, InvalidParams, NotSupported
from aiosd.kernel.agents import Agent, Backend, Follower, Launch, Limits, LogLine, Usage, no_lines
from aiosd.osbridge.executor import USER_PATH

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
SERVICE = "org.freedesktop.systemd1.Service"
PROPERTIES = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"

#: The slice of every agent; the dash makes it a child of ``aiosd.slice``.
SLICE = "aiosd-agents.slice"
#: Agents' units are ``aiosd-agent-<aid>.service``.
UNIT_PREFIX = "aiosd-agent-"
UNIT_SUFFIX = ".service"
CGROUP_ROOT = "/sys/fs/cgroup"
#: systemd's "no limit" for 64-bit limits.
INFINITY = (1 << 64) - 1
#: How long a call to systemd may take (systemd answers in milliseconds; this is for a
#: machine under heavy load, or an emulated one).
CALL_TIMEOUT_MS = 60_000
#: How long the start job of an agent's unit may take.
START_TIMEOUT = 90.0
#: Seconds between two samples of each agent's cgroup (what it used is otherwise only read
#: when asked for; the last sample is what an ended agent is left with).
SAMPLE_INTERVAL = 1.0
#: How long a follower keeps reading after the agent ended: journald writes what the
#: agent's last lines were a moment after it has gone.
DRAIN_TIMEOUT = 1.0
#: How long a follower's thread waits for the journal before it looks whether to stop.
WAIT_STEP = 0.25
#: Entries a follower hands to the event loop at once.
FOLLOW_BATCH = 256

#: ActiveState values of a unit whose processes may run.
_RUNNING = frozenset({"activating", "active", "reloading", "deactivating"})
#: Exit statuses systemd's own child uses when a step before the program failed
#: (systemd.exec(5), "Process Exit Codes"): the program never ran.
_EXEC_STEPS = {
    200: "cannot enter the working directory {cwd}",
    203: "cannot execute {prog} (missing, or not executable by the user)",
    216: "cannot take the user's groups",
    217: "cannot become the user",
}


def unit_name(aid: str) -> str:
    """The unit of agent ``aid``."""
    return f"{UNIT_PREFIX}{aid}{UNIT_SUFFIX}"


def unit_path(name: str) -> str:
    """The bus object path of the unit ``name``, as systemd makes it (sd_bus_path_encode):
    every byte but ASCII letters, and digits not first, as ``_xx``."""
    out = []
    for i, byte in enumerate(name.encode()):
        c = chr(byte)
        if ("a" <= c <= "z") or ("A" <= c <= "Z") or (i > 0 and "0" <= c <= "9"):
            out.append(c)
        else:
            out.append(f"_{byte:02x}")
    return f"{MANAGER_PATH}/unit/{''.join(out) or '_'}"


def default_cgroup(name: str) -> str:
    """Where systemd puts the unit ``name`` in the cgroup tree (the slice's dash nests it)."""
    return f"/aiosd.slice/{SLICE}/{name}"


class BusError(Exception):
    """A call to systemd failed: the D-Bus error's name and its message."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{message} ({name})" if name else message)
        self.name = name
        self.message = message


def _bus_error(exc: Any) -> BusError:
    name = Gio.DBusError.get_remote_error(exc) or ""
    Gio.DBusError.strip_remote_error(exc)
    return BusError(name, str(exc.message))


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.done():
        return  # its waiter gave up
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


class _Subscription:
    """One signal subscription; its id is the GLib thread's alone."""

    id: int | None = None


class _Bus:
    """The backend's own system bus connection, and the GLib thread it is used from.

    Work for the GLib thread goes through one queue, so calls reach systemd in the order
    they were made (a SIGCONT before the SIGTERM that follows it).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ctx = GLib.MainContext.new()
        self._main = GLib.MainLoop.new(self._ctx, False)
        self._queue: collections.deque[Callable[[], None]] = collections.deque()
        self._thread = threading.Thread(target=self._run, name="systemd-bus", daemon=True)
        self._con: Any = None
        #: systemd's unique name on the bus: signals from anyone else are ignored.
        self.owner = ""

    # --- the GLib thread ------------------------------------------------------------------

    def _run(self) -> None:
        self._ctx.push_thread_default()  # replies and signals arrive in this context
        try:
            self._main.run()
        finally:
            self._ctx.pop_thread_default()

    def _drain(self, *_: object) -> bool:
        while self._queue:
            fn = self._queue.popleft()
            try:
                fn()
            except Exception:
                log.exception("agents: systemd bus: a call failed in the GLib thread")
        return False  # GLib.SOURCE_REMOVE

    def submit(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the GLib thread, after everything submitted before it."""
        self._queue.append(fn)
        self._ctx.invoke_full(GLib.PRIORITY_DEFAULT, self._drain)

    def _resolve(
        self, fut: asyncio.Future[Any], value: Any = None, exc: BaseException | None = None
    ) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody waits
            self._loop.call_soon_threadsafe(_settle, fut, value, exc)

    # --- the event loop's side --------------------------------------------------------------

    async def open(self) -> None:
        """Start the thread and connect to the system bus."""
        self._thread.start()
        fut: asyncio.Future[None] = self._loop.create_future()

        def connect() -> None:
            try:
                address = Gio.dbus_address_get_for_bus_sync(Gio.BusType.SYSTEM, None)
                con = Gio.DBusConnection.new_for_address_sync(
                    address,
                    Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                    | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
                    None,
                    None,
                )
                con.set_exit_on_close(False)
            except GLib.Error as exc:
                self._resolve(fut, exc=BackendUnavailable(f"cannot reach the system bus: {exc}"))
            else:
                self._con = con
                self._resolve(fut)

        self.submit(connect)
        try:
            await fut
            (self.owner,) = await self.call(
                DBUS, "/org/freedesktop/DBus", DBUS, "GetNameOwner", GLib.Variant("(s)", (SYSTEMD,))
            )
        except BusError as exc:
            await self.close()
            raise BackendUnavailable(f"systemd is not on the system bus: {exc.message}") from None
        except BaseException:
            await self.close()
            raise
        self.subscribe(
            DBUS, DBUS, "NameOwnerChanged", "/org/freedesktop/DBus", self._owner, arg0=SYSTEMD
        )

    def _owner(self, _path: str, args: tuple[Any, ...]) -> None:
        # systemd re-executed (daemon-reexec) and came back under a new name (the GLib
        # thread has taken it already).
        log.info("agents: systemd is %s on the bus now", args[2] or "gone")

    def call(
        self,
        dest: str,
        path: str,
        iface: str,
        method: str,
        args: Any = None,
    ) -> asyncio.Future[tuple[Any, ...]]:
        """Call ``method``; its reply, unpacked, or :class:`BusError`."""
        fut: asyncio.Future[tuple[Any, ...]] = self._loop.create_future()

        def finish(con: Any, res: Any, *_: object) -> None:
            try:
                value = con.call_finish(res).unpack()
            except GLib.Error as exc:
                self._resolve(fut, exc=_bus_error(exc))
            else:
                self._resolve(fut, value)

        def start() -> None:
            con = self._con
            if con is None or con.is_closed():
                self._resolve(fut, exc=BusError("", "the connection to the system bus is closed"))
                return
            con.call(
                dest,
                path,
                iface,
                method,
                args,
                None,
                Gio.DBusCallFlags.NONE,
                CALL_TIMEOUT_MS,
                None,
                finish,
            )

        self.submit(start)
        return fut

    def systemd(
        self, method: str, *args: tuple[str, Any], path: str = MANAGER_PATH, iface: str = MANAGER
    ) -> asyncio.Future[tuple[Any, ...]]:
        """Call a method of systemd's; ``args`` as (D-Bus type, value) pairs."""
        params = None
        if args:
            sig = "".join(t for t, _ in args)
            params = GLib.Variant(f"({sig})", tuple(v for _, v in args))
        return self.call(SYSTEMD, path, iface, method, params)

    def subscribe(
        self,
        sender: str,
        iface: str,
        member: str,
        path: str,
        handler: Callable[[str, tuple[Any, ...]], None],
        arg0: str | None = None,
    ) -> _Subscription:
        """Have ``handler(path, args)`` called on the event loop for each such signal."""
        sub = _Subscription()

        def on_signal(
            _con: Any, from_: str, opath: str, _iface: str, _member: str, params: Any, *_: object
        ) -> None:
            # Only the bus daemon's signals and systemd's count (a unicast signal from
            # anyone could otherwise pretend an agent has ended).
            if from_ != (DBUS if sender == DBUS else self.owner):
                return
            if sender == DBUS and member == "NameOwnerChanged":
                # Here, not on the event loop: systemd's next signals come from its new name.
                self.owner = params.unpack()[2]
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(handler, opath, params.unpack())

        def start() -> None:
            if self._con is not None:
                sub.id = self._con.signal_subscribe(
                    sender, iface, member, path, arg0, Gio.DBusSignalFlags.NONE, on_signal
                )

        self.submit(start)
        return sub

    def unsubscribe(self, sub: _Subscription) -> None:
        def stop() -> None:
            if sub.id is not None and self._con is not None:
                self._con.signal_unsubscribe(sub.id)
            sub.id = None

        self.submit(stop)

    async def close(self) -> None:
        """Close the connection and end the thread."""
        if not self._thread.is_alive():
            return
        done: asyncio.Future[None] = self._loop.create_future()

        def stop() -> None:
            con, self._con = self._con, None
            if con is not None:
                with contextlib.suppress(GLib.Error):
                    con.close_sync(None)
            self._main.quit()
            self._resolve(done)

        self.submit(stop)
        await done
        await asyncio.to_thread(self._thread.join, 5)


@dataclasses.dataclass
class _Unit:
    """A live agent's unit, as the backend follows it."""

    aid: str
    uid: int
    limits: Limits
    prog: str
    cwd: str
    name: str = ""
    path: str = ""
    cgroup: str = ""
    pid: int = 0
    #: launch() has returned (or open() has taken the unit over): an end may be reported.
    launched: bool = False
    #: Seen starting or running: from now on "inactive" means it has ended.
    started: bool = False
    #: Suspended with the cgroup freezer (rather than SIGSTOP).
    frozen: bool = False
    #: The service's properties as systemd last announced them (ExecMain*, Result, MainPID).
    service: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: How it ended (exit code, signal, reason), once it has.
    end: tuple[int | None, int | None, str] | None = None
    reported: bool = False
    usage: Usage = dataclasses.field(default_factory=Usage)
    #: Set once the end has been reported: followers stop reading then.
    over: threading.Event = dataclasses.field(default_factory=threading.Event)
    subscription: _Subscription | None = None

    def __post_init__(self) -> None:
        self.name = self.name or unit_name(self.aid)
        self.path = self.path or unit_path(self.name)
        self.cgroup = self.cgroup or default_cgroup(self.name)


class _Follower(Follower):
    """A follower fed by the agent's journal thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop

    def _put(self, batch: list[LogLine], over: bool) -> None:
        for line in batch:
            self.put(line)
        if over:
            self.end()

    def deliver(self, batch: list[LogLine], over: bool) -> None:
        """From the journal thread: hand ``batch`` to the event loop."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody follows
            self.loop.call_soon_threadsafe(self._put, batch, over)


def _how_it_ended(u: _Unit) -> tuple[int | None, int | None, str]:
    """(exit code, signal, reason) from the service's last announced properties."""
    svc = u.service
    kind, status = svc.get("ExecMainCode", 0), svc.get("ExecMainStatus", 0)
    result = str(svc.get("Result", ""))
    code: int | None = None
    sig: int | None = None
    if kind == 1:  # CLD_EXITED
        code = int(status)
    elif kind in (2, 3):  # CLD_KILLED, CLD_DUMPED
        sig = int(status)
    lim = u.limits
    if result == "oom-kill":
        if lim.memory_max:
            reason = (
                "memory limit: the kernel's OOM killer ended it "
                f"(memory_max {lim.memory_max // 1024} KiB)"
            )
        else:
            reason = "out of memory: the kernel's OOM killer ended it"
    elif result == "timeout":
        reason = f"runtime limit: ran for {lim.runtime_max:g} s (runtime_max)"
    elif result in ("", "success", "exit-code", "signal", "core-dump"):
        reason = ""  # the exit code or signal says it all
    else:
        reason = f"systemd ended it (result {result!r})"
    if code is None and sig is None and not reason:
        reason = f"its processes ended; systemd did not say how (result {result or 'unknown'!r})"
    return code, sig, reason


def _start_failure(u: _Unit, job: str) -> str:
    """Why an agent's unit did not start, in words."""
    svc = u.service
    if svc.get("ExecMainCode") == 1 and svc.get("ExecMainStatus") in _EXEC_STEPS:
        return _EXEC_STEPS[svc["ExecMainStatus"]].format(cwd=u.cwd, prog=u.prog)
    if svc.get("ExecMainCode") == 1:
        return f"systemd's start of the program failed (status {svc.get('ExecMainStatus')})"
    result = svc.get("Result", "")
    return f"systemd's start job ended with {job!r}" + (f" (result {result!r})" if result else "")


def _description(aid: str, argv: list[str]) -> str:
    text = f"aiosd agent {aid}: {shlex.join(argv)}"
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= 256 else text[:255] + "…"


def _program(spec: Launch) -> str:
    """The absolute path of the agent's program: found in its PATH as ``env`` would, or
    relative to its working directory."""
    prog = spec.argv[0]
    if "/" in prog:
        return os.path.normpath(os.path.join(spec.cwd, prog))
    found = shutil.which(prog, path=spec.env.get("PATH", USER_PATH))
    if found is None:
        raise NotSupported(f"{prog}: not found in the agent's PATH")
    return os.path.abspath(found)


def _sample_all(units: list[_Unit]) -> None:
    for u in units:
        _sample(u)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _sample(u: _Unit) -> None:
    """Read what the agent's cgroup uses now into ``u.usage`` (nothing if it is gone)."""
    base = CGROUP_ROOT + u.cgroup
    try:
        rss = int(_read(f"{base}/memory.current"))
        tasks = int(_read(f"{base}/pids.current"))
        cpu = 0.0
        for line in _read(f"{base}/cpu.stat").splitlines():
            if line.startswith(b"usage_usec "):
                cpu = int(line.split()[1]) / 1e6
                break
    except (OSError, ValueError):
        return
    try:
        peak = int(_read(f"{base}/memory.peak"))  # Linux 5.19 and later
    except (OSError, ValueError):
        peak = rss
    old = u.usage
    u.usage = Usage(
        cpu_s=max(cpu, old.cpu_s), rss=rss, tasks=tasks, max_rss=max(old.max_rss, peak, rss)
    )


class SystemdBackend(Backend):
    """Agents as transient systemd units; see the module's docstring."""

    name = "systemd"

    def __init__(self, cfg: AgentsConfig, state_dir: Path) -> None:
        self.cfg = cfg
        #: Unused: the journal keeps the agents' output (the argument is the subprocess
        #: backend's log directory, given to either backend alike).
        self.state_dir = state_dir
        self._bus: _Bus | None = None
        self._units: dict[str, _Unit] = {}
        #: Start jobs under way: unit name -> the job's result, from JobRemoved.
        self._jobs: dict[str, asyncio.Future[str]] = {}
        self._manager_subs: list[_Subscription] = []
        self._sampler: asyncio.Task[None] | None = None

    # --- life of the backend --------------------------------------------------------------

    async def open(self, known: list[Agent]) -> set[str]:
        """Connect, and take over the agents in ``known`` whose units still run.

        A unit of ours that runs but belongs to no agent in ``known`` (its record was lost,
        or says it ended) is stopped: nobody could see or end it otherwise.
        """
        bus = _Bus(asyncio.get_running_loop())
        await bus.open()
        self._bus = bus
        self._manager_subs = [
            bus.subscribe(SYSTEMD, MANAGER, "JobRemoved", MANAGER_PATH, self._job_removed),
            bus.subscribe(SYSTEMD, MANAGER, "UnitRemoved", MANAGER_PATH, self._unit_removed),
        ]
        try:
            # systemd sends unit signals only while someone is subscribed.
            await bus.systemd("Subscribe")
            (units,) = await bus.systemd(
                "ListUnitsByPatterns",
                ("as", sorted(_RUNNING)),
                ("as", [f"{UNIT_PREFIX}*{UNIT_SUFFIX}"]),
            )
        except BusError as exc:
            await self.close()
            raise BackendUnavailable(f"systemd on the system bus: {exc.message}") from None
        by_aid = {a.aid: a for a in known}
        kept: set[str] = set()
        for unit in units:
            name, path = str(unit[0]), str(unit[6])
            aid = name[len(UNIT_PREFIX) : -len(UNIT_SUFFIX)]
            a = by_aid.get(aid)
            if a is None:
                log.warning("agents: %s runs, but no agent of it is known: stopping it", name)
                self._quietly(bus.systemd("StopUnit", ("s", name), ("s", "replace")), name)
                continue
            if await self._take_over(a, name, path):
                kept.add(aid)
        loop = asyncio.get_running_loop()
        for aid in kept:
            u = self._units[aid]
            u.launched = True
            if u.end is not None:  # it ended meanwhile: told once the manager knows it
                loop.call_soon(self._report, u)
        self._sampler = loop.create_task(self._sampling())
        return kept

    async def _take_over(self, a: Agent, name: str, path: str) -> bool:
        assert self._bus is not None
        u = _Unit(
            a.aid,
            a.uid,
            a.limits,
            prog=a.argv[0] if a.argv else "",
            cwd=a.cwd,
            name=name,
            path=path,
            started=True,
        )
        self._units[a.aid] = u
        self._watch(u)
        try:
            state, freezer, cgroup, pid, uid = await asyncio.gather(
                self._get(u, UNIT, "ActiveState"),
                self._get(u, UNIT, "FreezerState"),
                self._get(u, SERVICE, "ControlGroup"),
                self._get(u, SERVICE, "MainPID"),
                self._get(u, SERVICE, "UID"),
            )
        except BusError as exc:
            log.info("agents: %s ended while the daemon took it over (%s)", name, exc)
            self._drop(u)
            return False
        if uid != a.uid:
            log.error("agents: %s runs as uid %s, not as its agent's owner %s", name, uid, a.uid)
            self._drop(u)
            return False
        if state not in _RUNNING and u.end is None:
            self._drop(u)
            return False
        u.cgroup = str(cgroup) or u.cgroup
        u.pid = int(pid)
        u.frozen = freezer in ("frozen", "freezing")
        log.info("agents: took over %s (pid %d, %s)", name, u.pid, state)
        return True

    async def close(self) -> None:
        """Stop listening to systemd; agents still running keep running (a later daemon
        takes them over)."""
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        bus, self._bus = self._bus, None
        if bus is None:
            return
        for u in self._units.values():
            u.over.set()  # followers end
        with contextlib.suppress(BusError):
            await bus.systemd("Unsubscribe")
        await bus.close()

    # --- starting -------------------------------------------------------------------------

    async def launch(self, spec: Launch) -> int:
        bus = self._bus
        if bus is None:
            raise NotSupported("the systemd agent backend is not open")
        acct = spec.account
        if acct.uid == 0 or acct.gid == 0:
            # Not even when root asks: an agent is a user's program.
            raise InvalidParams("programs are never started as root (uid 0 or gid 0)")
        if not spec.argv or not spec.argv[0]:
            raise InvalidParams("invalid params: argv: the program to run is missing")
        prog = _program(spec)
        u = _Unit(spec.aid, acct.uid, spec.limits, prog=prog, cwd=spec.cwd)
        self._units[u.aid] = u
        self._watch(u)  # before the start: no signal of the unit's can be missed
        job: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._jobs[u.name] = job
        sent = False
        try:
            start = bus.systemd(
                "StartTransientUnit",
                ("s", u.name),
                ("s", "fail"),
                ("a(sv)", self._properties(spec, prog)),
                ("a(sa(sv))", []),
            )
            sent = True
            await start
            try:
                result = await asyncio.wait_for(job, START_TIMEOUT)
            except TimeoutError:
                raise NotSupported(
                    f"{spec.argv[0]}: systemd did not start it within {START_TIMEOUT:g} s"
                ) from None
            if result != "done":
                raise NotSupported(f"{spec.argv[0]}: {_start_failure(u, result)}")
            got: tuple[Any, Any] = await asyncio.gather(
                self._get(u, SERVICE, "MainPID"),
                self._get(u, SERVICE, "ControlGroup"),
                return_exceptions=True,
            )
        except BusError as exc:
            self._drop(u)
            if exc.name == "org.freedesktop.DBus.Error.InvalidArgs":
                raise InvalidParams(
                    f"invalid params: systemd refuses the agent: {exc.message}"
                ) from None
            raise NotSupported(f"{spec.argv[0]}: systemd: {exc.message}") from None
        except BaseException:
            if sent and u.end is None:  # cancelled, or timed out: leave nothing running
                self._quietly(self._kill(u, signal.SIGKILL), u.name)
            self._drop(u)
            raise
        finally:
            self._jobs.pop(u.name, None)
        # The unit may have ended (and be gone) already: what systemd announced then.
        pid, cgroup = got
        u.pid = pid if isinstance(pid, int) and pid else int(u.service.get("ExecMainPID", 0))
        if isinstance(cgroup, str) and cgroup:
            u.cgroup = cgroup
        u.launched = True
        if u.end is not None:
            asyncio.get_running_loop().call_soon(self._report, u)  # after the manager has it
        return u.pid

    def _properties(self, spec: Launch, prog: str) -> list[tuple[str, Any]]:
        """The transient unit's settings (systemd.exec(5), systemd.resource-control(5))."""
        acct, lim = spec.account, spec.limits

        def v(sig: str, value: Any) -> Any:
            return GLib.Variant(sig, value)

        props = [
            ("Description", v("s", _description(spec.aid, spec.argv))),
            # The start job is done once the program runs: a program that cannot start
            # fails the start, not the agent later.
            ("Type", v("s", "exec")),
            ("ExecStart", v("a(sasb)", [(prog, spec.argv, False)])),
            ("User", v("s", str(acct.uid))),
            ("Group", v("s", str(acct.gid))),
            ("SupplementaryGroups", v("as", [str(g) for g in acct.groups])),
            ("WorkingDirectory", v("s", spec.cwd)),
            # Complete and clean already (systemd adds only INVOCATION_ID, JOURNAL_STREAM and
            # SYSTEMD_EXEC_PID of its own).
            ("Environment", v("as", [f"{k}={val}" for k, val in spec.env.items()])),
            ("Slice", v("s", SLICE)),
            # Ended, the unit is forgotten at once, failed or not (see the module's docstring).
            ("CollectMode", v("s", "inactive-or-failed")),
            # Every process of the agent is signalled and ended with it; what is left when
            # the main process has ended gets SIGTERM, then SIGKILL after stop_timeout.
            ("KillMode", v("s", "control-group")),
            ("TimeoutStopUSec", v("t", int(self.cfg.stop_timeout * 1e6))),
            # An OOM kill of any of its processes ends the whole agent, with Result oom-kill.
            ("OOMPolicy", v("s", "stop")),
            ("CPUWeight", v("t", lim.cpu_weight)),
            ("TasksMax", v("t", lim.tasks_max or INFINITY)),
            ("NoNewPrivileges", v("b", True)),
            ("CapabilityBoundingSet", v("t", 0)),
            ("RestrictSUIDSGID", v("b", True)),
            ("LockPersonality", v("b", True)),
            ("RestrictRealtime", v("b", True)),
            # No core files of the agent's memory (as in the subprocess backend).
            ("LimitCORE", v("t", 0)),
            ("LimitCORESoft", v("t", 0)),
            ("UMask", v("u", 0o077)),
            # An ordinary process gets SIGPIPE (systemd ignores it in services by default,
            # which changes how pipelines inside the agent end).
            ("IgnoreSIGPIPE", v("b", False)),
            ("StandardInput", v("s", "null")),
            ("StandardOutput", v("s", "journal")),
            ("StandardError", v("s", "journal")),
            ("LogExtraFields", v("aay", [f"AIOSD_AGENT_ID={spec.aid}".encode()])),
        ]
        if lim.memory_max:
            props.append(("MemoryMax", v("t", lim.memory_max)))
            # memory_max is resident memory: the limit is not to be dodged by swapping.
            props.append(("MemorySwapMax", v("t", 0)))
        if lim.runtime_max:
            props.append(("RuntimeMaxUSec", v("t", int(lim.runtime_max * 1e6))))
        return props

    # --- following the units ----------------------------------------------------------------

    def _watch(self, u: _Unit) -> None:
        assert self._bus is not None
        u.subscription = self._bus.subscribe(
            SYSTEMD,
            PROPERTIES,
            "PropertiesChanged",
            u.path,
            lambda _path, args: self._changed(u, args),
        )

    def _drop(self, u: _Unit) -> None:
        """Stop following ``u`` (it ended, or never started)."""
        if self._units.get(u.aid) is u:
            del self._units[u.aid]
        if u.subscription is not None and self._bus is not None:
            self._bus.unsubscribe(u.subscription)
        u.subscription = None
        u.over.set()

    def _changed(self, u: _Unit, args: tuple[Any, ...]) -> None:
        iface, changed, _invalidated = args
        if u.end is not None:
            return
        if iface == SERVICE:
            # Sent before the unit's own: when ActiveState says it ended, these are final.
            u.service.update(changed)
        elif iface == UNIT and "ActiveState" in changed:
            state = changed["ActiveState"]
            if state in _RUNNING:
                u.started = True
            elif state in ("inactive", "failed") and u.started:
                self._ended(u)

    def _job_removed(self, _path: str, args: tuple[Any, ...]) -> None:
        _id, _job, unit, result = args
        fut = self._jobs.get(unit)
        if fut is not None and not fut.done():
            fut.set_result(str(result))

    def _unit_removed(self, _path: str, args: tuple[Any, ...]) -> None:
        unit = str(args[0])
        if not unit.startswith(UNIT_PREFIX):
            return
        u = self._units.get(unit[len(UNIT_PREFIX) : -len(UNIT_SUFFIX)])
        if u is not None and u.end is None:
            self._ended(u)  # its end went unseen; what is known of it

    def _ended(self, u: _Unit) -> None:
        u.end = _how_it_ended(u)
        if u.launched:
            self._report(u)

    def _report(self, u: _Unit) -> None:
        if u.reported or u.end is None:
            return
        u.reported = True
        code, sig, reason = u.end
        try:
            self.on_exit(u.aid, code, sig, reason)  # it reads the last usage(): still here
        finally:
            self._drop(u)

    def _quietly(self, fut: asyncio.Future[tuple[Any, ...]], what: str) -> None:
        """Let a call run on; log its failure, unless the unit is simply gone."""

        def done(f: asyncio.Future[tuple[Any, ...]]) -> None:
            exc = f.exception() if not f.cancelled() else None
            if isinstance(exc, BusError) and not exc.name.endswith(("NoSuchUnit", "UnknownObject")):
                log.warning("agents: %s: %s", what, exc)

        fut.add_done_callback(done)

    async def _get(self, u: _Unit, iface: str, prop: str) -> Any:
        assert self._bus is not None
        (value,) = await self._bus.call(
            SYSTEMD, u.path, PROPERTIES, "Get", GLib.Variant("(ss)", (iface, prop))
        )
        return value

    # --- acting -----------------------------------------------------------------------------

    def _kill(self, u: _Unit, sig: int) -> asyncio.Future[tuple[Any, ...]]:
        assert self._bus is not None
        return self._bus.systemd("KillUnit", ("s", u.name), ("s", "all"), ("i", int(sig)))

    def _live(self, agent: Agent) -> _Unit | None:
        u = self._units.get(agent.aid)
        return u if u is not None and u.end is None and self._bus is not None else None

    def signal(self, agent: Agent, sig: int) -> None:
        u = self._live(agent)
        if u is None:
            return
        if sig == signal.SIGCONT and u.frozen:
            # The manager continues a suspended agent before it asks it to end.
            assert self._bus is not None
            u.frozen = False
            self._quietly(self._bus.systemd("ThawUnit", ("s", u.name)), f"thaw {u.name}")
        self._quietly(self._kill(u, sig), f"signal {sig} to {u.name}")

    async def suspend(self, agent: Agent) -> None:
        """Freeze the agent's cgroup (the processes cannot tell); where systemd cannot
        (cgroup v1), SIGSTOP every process instead."""
        u = self._live(agent)
        if u is None:
            return
        assert self._bus is not None
        try:
            await self._bus.systemd("FreezeUnit", ("s", u.name))
        except BusError as exc:
            log.info("agents: %s cannot freeze (%s): SIGSTOP", u.name, exc.message)
            with contextlib.suppress(BusError):
                await self._kill(u, signal.SIGSTOP)
        else:
            u.frozen = True

    async def resume(self, agent: Agent) -> None:
        u = self._live(agent)
        if u is None:
            return
        assert self._bus is not None
        with contextlib.suppress(BusError):
            if u.frozen:
                u.frozen = False
                await self._bus.systemd("ThawUnit", ("s", u.name))
            else:
                await self._kill(u, signal.SIGCONT)

    # --- who is who -------------------------------------------------------------------------

    def identify(self, pid: int, uid: int) -> str | None:
        """The agent whose cgroup the process is in (or below: no process of an agent can
        leave it, and nobody else's process can enter it)."""
        try:
            with open(f"/proc/{pid}/cgroup", "rb") as f:
                data = f.read()
        except OSError:
            return None
        for line in data.splitlines():
            if not line.startswith(b"0::"):
                continue  # a cgroup v1 hierarchy
            path = line[3:].decode(errors="replace")
            for part in path.split("/"):
                if part.startswith(UNIT_PREFIX) and part.endswith(UNIT_SUFFIX):
                    u = self._units.get(part[len(UNIT_PREFIX) : -len(UNIT_SUFFIX)])
                    if (
                        u is not None
                        and u.end is None
                        and u.uid == uid
                        and (path == u.cgroup or path.startswith(u.cgroup + "/"))
                    ):
                        return u.aid
                    return None
        return None

    def usage(self, agent: Agent) -> Usage:
        """From the agent's cgroup: memory.current (what MemoryMax bounds: resident memory
        and the page cache the agent caused), memory.peak, pids.current, cpu.stat."""
        u = self._units.get(agent.aid)
        if u is None:
            return Usage()
        if u.end is None:
            _sample(u)
        return dataclasses.replace(u.usage)

    async def _sampling(self) -> None:
        """Sample every agent now and then, so that an ended one keeps what it used last
        (its cgroup is gone when it is reported)."""
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            live = [u for u in self._units.values() if u.end is None and u.launched]
            if live:
                await asyncio.to_thread(_sample_all, live)

    # --- logs -------------------------------------------------------------------------------

    async def logs(self, agent: Agent, tail: int) -> list[LogLine]:
        """The last ``tail`` lines of the agent in the journal (all as "stdout")."""
        return await asyncio.to_thread(read_journal, unit_name(agent.aid), tail)

    def follow(self, agent: Agent) -> AsyncIterator[LogLine | int]:
        u = self._units.get(agent.aid)
        if u is None or u.reported:
            return no_lines()
        # The journal's reader starts now: it takes its place at the end of the journal
        # before the caller reads the kept lines.
        f = _Follower(asyncio.get_running_loop())
        stop = threading.Event()
        thread = threading.Thread(
            target=follow_journal,
            args=(u.name, u.over, stop, f.deliver),
            name=f"journal-{u.aid}",
            daemon=True,
        )
        thread.start()
        return self._following(f, stop, thread)

    async def _following(
        self, f: _Follower, stop: threading.Event, thread: threading.Thread
    ) -> AsyncIterator[LogLine | int]:
        try:
            async for item in f.drain():
                yield item
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)

    async def forget(self, agent: Agent) -> None:
        """Nothing: the journal cannot drop single entries; journald's retention ages the
        agent's lines out with everything else."""


# --- the journal (in worker threads) ----------------------------------------------------------


def _reader(unit: str) -> Any:
    from systemd import journal  # only here: the daemon runs without it on other backends

    r = journal.Reader()
    # Both fields are set by journald alone: the agent's own output, not what anyone wrote
    # into the journal naming the agent.
    r.add_match(_SYSTEMD_UNIT=unit, _TRANSPORT="stdout")
    return r


def _line(entry: dict[str, Any]) -> LogLine:
    when = entry.get("__REALTIME_TIMESTAMP")
    msg = entry.get("MESSAGE", "")
    if isinstance(msg, bytes):  # not UTF-8
        msg = msg.decode(errors="replace")
    return LogLine(when.timestamp() if when is not None else time.time(), "stdout", str(msg))


def read_journal(unit: str, tail: int) -> list[LogLine]:
    """The last ``tail`` lines the unit's processes wrote, oldest first."""
    if tail <= 0:
        return []
    r = _reader(unit)
    try:
        r.seek_tail()
        out: list[LogLine] = []
        while len(out) < tail:
            entry = r.get_previous()
            if not entry:
                break
            out.append(_line(entry))
    finally:
        r.close()
    out.reverse()
    return out


def follow_journal(
    unit: str,
    over: threading.Event,
    stop: threading.Event,
    deliver: Callable[[list[LogLine], bool], None],
) -> None:
    """Hand the unit's new lines to ``deliver`` until ``stop``, or until the agent is
    ``over`` and nothing more came for DRAIN_TIMEOUT; then ``deliver([], True)``."""
    r = None
    try:
        r = _reader(unit)
        r.seek_tail()
        if not r.get_previous():  # at the last entry: what follows is new
            # None yet: from the head (after a tail seek with nothing before it, sd-journal
            # skips the first entry that comes).
            r.seek_head()
        quiet_since: float | None = None
        while not stop.is_set():
            batch: list[LogLine] = []
            while len(batch) < FOLLOW_BATCH:
                entry = r.get_next()
                if not entry:
                    break
                batch.append(_line(entry))
            if batch:
                deliver(batch, False)
                quiet_since = None
                continue
            if over.is_set():
                now = time.monotonic()
                if quiet_since is None:
                    quiet_since = now
                elif now - quiet_since >= DRAIN_TIMEOUT:
                    break
            r.wait(WAIT_STEP)
    except Exception:
        log.exception("agents: following %s in the journal failed", unit)
    finally:
        if r is not None:
            r.close()
        deliver([], True)

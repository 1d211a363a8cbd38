"""Helpers shared by the tests: a real daemon process, a notify socket, raw JSON-RPC clients."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aiosd.errors import NotFound

REPO = Path(__file__).resolve().parents[1]


class NotifySocket:
    """A NOTIFY_SOCKET the test owns: records every sd_notify message with its arrival time."""

    def __init__(self, path: Path, on_message: Any = None) -> None:
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self.on_message = on_message
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path.unlink(missing_ok=True)  # left by an earlier daemon in the same directory
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data and self._closed:  # close() shut the socket down to wake us
                return
            now = time.monotonic()
            fields = data.decode().splitlines()
            if self.on_message is not None:
                for field in fields:
                    self.on_message(field)
            with self._cond:  # a datagram's fields arrive together, as systemd reads them
                self.messages.extend((now, field) for field in fields)
                self._cond.notify_all()

    def wait_for(
        self,
        field: str,
        timeout: float = 60.0,
        count: int = 1,
        abort: Callable[[], str | None] | None = None,
    ) -> float:
        """Wait until ``field`` (e.g. READY=1) has arrived ``count`` times; return the arrival
        time of the ``count``-th.

        ``abort`` is asked a few times a second while waiting: a message it returns (say,
        "the daemon exited") fails the wait at once instead of at the timeout.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                times = [t for t, f in self.messages if f == field]
                if len(times) >= count:
                    return times[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{field} x{count} not received within {timeout}s: "
                        f"{[f for _, f in self.messages]}"
                    )
                if abort is not None and (why := abort()) is not None:
                    raise AssertionError(f"{why} before {field} x{count} arrived")
                # Woken by each message; the slice only bounds how late ``abort`` is asked.
                self._cond.wait(min(left, 0.1) if abort is not None else left)

    def fields(self) -> list[str]:
        """Every field received so far."""
        with self._cond:
            return [f for _, f in self.messages]

    def times(self, field: str) -> list[float]:
        """Arrival times of every occurrence of ``field``."""
        with self._cond:
            return [t for t, f in self.messages if f == field]

    def close(self) -> None:
        """Stop listening, and wait for the reader thread to end (none is left behind)."""
        self._closed = True
        # shutdown() wakes a recv() blocked in the reader at once; close() alone would not.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not threading.current_thread():  # closed from on_message
            self._thread.join()
        self._sock.close()


def write_config(
    directory: Path, extra: str = "", slots: int = 2, dbus_address: str | None = None
) -> Path:
    """A config file that keeps every path of the daemon inside ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / "aiosd.toml"
    cfg.write_text(
        f"""
[daemon]
state_directory = "{directory / "state"}"
runtime_directory = "{directory / "run"}"
log_level = "info"
log_target = "stderr"

[dbus]
enabled = {"true" if dbus_address else "false"}
bus = "{dbus_address or "system"}"

[shutdown]
drain_timeout = 5.0
close_timeout = 3.0

[llm.models.smollm2]
backend = "llamacpp"
slots = {slots}
threads = 1
n_ctx = 2048
max_tokens = 256
{extra}
"""
    )
    return cfg


class Daemon:
    """A real aiosd process started for a test, stopped with SIGTERM."""

    def __init__(
        self,
        directory: Path,
        config: Path,
        argv_prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.directory = directory
        self.config = config
        self.socket_path = directory / "run" / "aiosd.sock"
        self.notify = NotifySocket(directory / "notify.sock")
        self.log_path = directory / "aiosd.log"
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **(env or {})}
        full_env.pop("LISTEN_FDS", None)
        full_env.pop("LISTEN_PID", None)
        cmd = (argv_prefix or []) + [sys.executable, "-m", "aiosd", "--config", str(config)]
        cmd += extra_args or []
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO
        )

    def wait_ready(self, timeout: float = 60.0, count: int = 1) -> float:
        """Block until the ``count``-th READY=1 (a reload sends one more); fail with the
        daemon's log if it exits first. Returns the arrival time of that READY=1."""
        try:
            return self.notify.wait_for("READY=1", timeout, count, abort=self._exited)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.log()}") from None

    def _exited(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return f"aiosd exited with {self.proc.returncode}"

    def wait_log(self, text: str, timeout: float = 30.0, count: int = 1) -> None:
        """Block until the daemon has logged ``text`` ``count`` times; fail with the log if not."""
        wait_until(
            lambda: self.log().count(text) >= count,
            timeout,
            f"{text!r} x{count} in the daemon log",
            self.log,
        )

    def log(self) -> str:
        """Everything the daemon wrote so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    raise AssertionError(
                        f"aiosd did not stop within {timeout}s:\n{self.log()}"
                    ) from None
        finally:
            # Even when it had to be killed: the notify reader must not outlive the test.
            self.notify.close()
            self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def shared_daemon(prefix: str, slots: int = 1) -> Iterator[Daemon]:
    """A daemon whose socket other users can reach (in a 0755 directory under /tmp),
    stopped on leaving."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    d = Daemon(directory, write_config(directory, slots=slots))
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


class UserClient:
    """JSON-RPC over a connection that a process of ``user`` made (bench/peer.py), so the
    daemon sees that user's credentials from the kernel; errors are raised as AiosError."""

    def __init__(self, user: Any, path: Path, timeout: float = 120.0) -> None:
        from bench.peer import Peer, identity

        self.peer = Peer(identity(user.name), path)
        self.sock = self.peer.socket(timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.ids = 0

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """One syscall; its result."""
        from aiosd.errors import error_for_code

        self.ids += 1
        frame = {"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params or {}}
        self.sock.sendall(json.dumps(frame).encode() + b"\n")
        while True:
            msg = json.loads(self.file.readline())
            if msg.get("id") == self.ids:
                break
        if "error" in msg:
            e = msg["error"]
            raise error_for_code(e["code"], e["message"], e.get("data"))
        return msg["result"]

    def close(self) -> None:
        """Close the connection; the user's process ends."""
        self.file.close()
        self.sock.close()
        self.peer.close()


class RawClient:
    """A line-oriented JSON-RPC client on a plain socket, for protocol tests."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are."""
        self.sock.sendall(data)

    def send(self, obj: Any) -> None:
        """Send one JSON frame."""
        self.send_raw(json.dumps(obj).encode() + b"\n")

    def recv(self) -> dict[str, Any]:
        """Read one JSON frame; fail on EOF."""
        line = self.file.readline()
        if not line:
            raise EOFError("connection closed by the daemon")
        frame: dict[str, Any] = json.loads(line)
        return frame

    def call(self, method: str, params: Any = None, req_id: Any = 1) -> dict[str, Any]:
        """Send a request and return its final response (skipping stream notifications)."""
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        while True:
            reply = self.recv()
            if reply.get("id") == req_id and "method" not in reply:
                return reply

    def close(self) -> None:
        """Close the connection."""
        self.file.close()
        self.sock.close()


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    detail: Callable[[], object] | None = None,
) -> None:
    """Wait until ``condition()`` holds, looking every 10 ms; fail after ``timeout`` seconds.

    For states the daemon shows only when asked (its queue, its log file): the timeout is a
    failure guard, never the expected wait.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            shown = f":\n{detail()}" if detail is not None else ""
            raise AssertionError(f"no {what} within {timeout}s{shown}")
        time.sleep(0.01)


def story_request(req_id: int, tokens: int) -> dict[str, object]:
    """A streamed ``llm.chat`` request whose answer runs for all of ``tokens``."""
    return {
        "jsonrpc": "2.0",
        "id": req_id,
        "method": "llm.chat",
        "params": {
            "messages": [{"role": "user", "content": "Write a very long story about a lighthouse"}],
            "max_tokens": tokens,
            "stream": True,
        },
    }


def queue_of(client: RawClient, model: str = "smollm2") -> dict[str, Any]:
    """``system.queue``'s entry for ``model``."""
    models = client.call("system.queue", req_id="queue")["result"]["models"]
    entry: dict[str, Any] = next(m for m in models if m["model"] == model)
    return entry


class PrivateBus:
    """A real dbus-daemon started from tests/dbus/bus.conf.in, with aiosd's bus policy."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        self.socket = directory / "bus.sock"
        self.address = f"unix:path={self.socket}"
        self.config = directory / "bus.conf"
        template = (REPO / "tests" / "dbus" / "bus.conf.in").read_text()
        policy = REPO / "packaging" / "dbus" / "org.aiosd.Daemon1.conf"
        self.config.write_text(
            template.replace("@LISTEN@", self.address).replace("@POLICY@", str(policy))
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the bus and wait until it accepts connections."""
        self.proc = subprocess.Popen(
            [
                "dbus-daemon",
                "--nofork",
                "--nopidfile",
                f"--config-file={self.config}",
                "--print-address",
            ],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        printed = self.proc.stdout.readline().decode().strip()
        assert printed.startswith(f"unix:path={self.socket}"), printed
        self.socket.chmod(0o777)

    def stop(self) -> None:
        """Kill the bus (as a crash would)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.socket.unlink(missing_ok=True)


def call_every_syscall(call: Any) -> set[str]:
    """Make every syscall once with valid params through ``call(name, params) -> result``.

    Returns the names called; tests compare them with the syscall table, so a new syscall
    must be added here to keep them green.
    """
    done: set[str] = set()

    def do(name: str, params: dict[str, Any]) -> Any:
        result = call(name, params)
        assert isinstance(result, dict), (name, result)
        done.add(name)
        return result

    do("llm.chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    for name in ("llm.models", "system.status", "system.queue", "storage.usage"):
        do(name, {})
    entry = {"collection": "reach", "key": "k"}
    do("storage.put", {**entry, "value": "reachable value"})
    do("storage.get", entry)
    do("storage.list", {"collection": "reach"})
    do("storage.search", {"query": "reachable"})
    do("storage.history", entry)
    do("storage.rollback", {**entry, "version": 1})
    do("storage.share", {"collection": "reach", "group": "root"})
    do("storage.unshare", {"collection": "reach", "group": "root"})
    do("storage.set_quota", {"user": 0, "quota_entries": 100000})
    do("storage.delete", entry)
    added = do("memory.add", {"content": "remember the reach test", "space": "reach"})
    mem = {"id": added["id"], "space": "reach"}
    do("memory.get", mem)
    do("memory.search", {"query": "remember", "space": "reach"})
    do("memory.update", {**mem, "pinned": True})
    do("memory.delete", mem)
    do("memory.clear", {"space": "reach"})
    # An agent of nobody's (the callers here are root, who may name the owner; root never
    # owns one).
    agent = do("agent.spawn", {"argv": ["/bin/sleep", "30"], "cwd": "/", "user": "nobody"})
    aid = {"aid": agent["aid"]}
    do("agent.info", aid)
    do("agent.list", {})
    do("agent.suspend", aid)
    do("agent.resume", aid)
    do("agent.kill", {**aid, "signal": "CONT"})
    do("agent.logs", {**aid, "tail": 5})
    do("agent.stop", {**aid, "timeout": 1})
    do("agent.wait", {**aid, "timeout": 5})
    do("agent.available", {})
    # Tools: root's calls run only the tools that run in the daemon (none runs as root).
    do("tool.list", {})
    do("tool.describe", {"name": "system.info"})
    do("tool.call", {"name": "system.info", "arguments": {}})
    do("tool.pending", {})
    do("tool.grants", {})
    do("tool.revoke", {"name": "fs.write"})
    # No request of root's waits: the handler answers NotFound, through the transport.
    try:
        call("tool.confirm", {"request": "0123456789abcdef", "allow": False})
    except NotFound as exc:
        assert "no confirmation request '0123456789abcdef'" in exc.message
        done.add("tool.confirm")
    return done


class BusSession:
    """A bus connection opened by ``user``'s own process (bench/peer.py; root's when None), so
    the bus and the daemon see that user's credentials from the kernel."""

    def __init__(self, bus: PrivateBus, user: Any = None) -> None:
        from gi.repository import Gio

        from bench.peer import Peer, identity

        self.peer: Peer | None = None
        if user is None:
            self.con = Gio.DBusConnection.new_for_address_sync(
                bus.address,
                Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
                None,
                None,
            )
        else:
            self.peer = Peer(identity(user.name), bus.socket, dbus=True)
            stream = Gio.Socket.new_from_fd(self.peer.fd).connection_factory_create_connection()
            self.con = Gio.DBusConnection.new_sync(
                stream, None, Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION, None, None
            )
        self.con.set_exit_on_close(False)

    def call(self, iface: str, method: str, args: Any = None, path: str | None = None) -> Any:
        """One call (on the manager object unless ``path``); its reply (GLib.Error if it is an
        error)."""
        from aiosd.api.dbus import names

        return self.con.call_sync(
            names.BUS_NAME, path or names.OBJECT_PATH, iface, method, args, None, 0, 120_000, None
        )

    def answer(
        self, iface: str, method: str, args: Any = None, path: str | None = None
    ) -> tuple[str, str]:
        """("ok", the reply as text) or (the error's D-Bus name, its message)."""
        from gi.repository import Gio, GLib

        try:
            return "ok", self.call(iface, method, args, path).print_(True)
        except GLib.Error as exc:
            name = Gio.DBusError.get_remote_error(exc) or ""
            return name, str(exc.message).removeprefix(f"GDBus.Error:{name}: ")

    def client(self) -> Any:
        """The SDK's BusClient on this connection."""
        import pydbus.bus

        from aiosd.sdk.dbus import BusClient

        client = BusClient("unix:path=/unused")
        client._bus = pydbus.bus.Bus(self.con)
        return client

    def close(self) -> None:
        """Close the connection (the peer's process ends too)."""
        self.con.close_sync(None)
        if self.peer is not None:
            self.peer.close()


def user_home(user: Any) -> Path:
    """The home directory of a test user (tests/conftest.py makes it, 0700, theirs)."""
    import pwd

    return Path(pwd.getpwuid(user.uid).pw_dir)


def owned(user: Any, path: Path, text: str | None = None, mode: int = 0o600) -> Path:
    """A file of ``user``'s holding ``text`` (with text None: a directory of theirs)."""
    if text is None:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    else:
        path.write_text(text)
        path.chmod(mode)
    os.chown(path, user.uid, user.gid)
    return path


class Streamed:
    """A ``tool.call`` with stream=true running on ``c`` (a UserClient) in a thread: the
    confirmation requests it is sent, and its outcome.  ``c`` is the thread's until then."""

    def __init__(self, c: UserClient, tool: str, **arguments: Any) -> None:
        self.c = c
        self.requests: list[dict[str, Any]] = []
        self.result: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        c.ids += 1
        self.id = c.ids
        params = {"name": tool, "arguments": arguments, "stream": True}
        frame = {"jsonrpc": "2.0", "id": self.id, "method": "tool.call", "params": params}
        c.sock.sendall(json.dumps(frame).encode() + b"\n")
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            msg = json.loads(self.c.file.readline())
            if msg.get("method") == "stream" and msg["params"]["id"] == self.id:
                self.requests.append(msg["params"]["confirm"])
            elif msg.get("id") == self.id:
                self.result, self.error = msg.get("result"), msg.get("error")
                return

    def request(self) -> dict[str, Any]:
        wait_until(lambda: self.requests, 10, "a confirmation request")
        return self.requests[0]

    def outcome(self, timeout: float = 30.0) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the call did not end"
        return self.result, self.error


def confirm(c: UserClient, request: str, allow: bool, remember: str = "once") -> Any:
    """Answer a confirmation request on ``c``."""
    return c.call("tool.confirm", {"request": request, "allow": allow, "remember": remember})


@contextlib.contextmanager
def module_daemon(prefix: str, extra: str = "", slots: int = 1) -> Iterator[Daemon]:
    """A daemon for one test module (its socket reachable by the test users), which must
    stop cleanly at the end."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    d = Daemon(directory, write_config(directory, slots=slots, extra=extra))
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0, d.log()


@contextlib.contextmanager
def user_connections(
    daemon: Daemon, unix_users: dict[str, Any], timeout: float = 120.0
) -> Iterator[Callable[[str], UserClient]]:
    """``open(who)``: a new connection made by a process of test user ``who``; all closed
    at the end."""
    opened: list[UserClient] = []

    def open_(who: str) -> UserClient:
        c = UserClient(unix_users[who], daemon.socket_path, timeout)
        opened.append(c)
        return c

    try:
        yield open_
    finally:
        for c in opened:
            c.close()


def loop_over_ollama(
    user: Any, stub_url: str, prompt: str, use_tools: list[str], prefix: str, extra: str = ""
) -> dict[str, Any]:
    """One ``llm.chat`` with ``use_tools`` by ``user``, on a daemon of its own whose model
    ``remote`` is the Ollama stub at ``stub_url``: its result."""
    from tests.ollama_stub import STUB_MODEL

    model = (
        f'[llm.models.remote]\nbackend = "ollama"\nhost = "{stub_url}"\nmodel = "{STUB_MODEL}"\n'
    )
    with module_daemon(prefix, model + extra) as d:
        c = UserClient(user, d.socket_path, 120)
        try:
            params = {
                "model": "remote",
                "messages": [{"role": "user", "content": prompt}],
                "use_tools": use_tools,
            }
            result: dict[str, Any] = c.call("llm.chat", params)
            return result
        finally:
            c.close()

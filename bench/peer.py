"""Connections made as another Unix user, and what the fuzzers read of the daemon's process.

The daemon takes a caller's identity from the kernel at ``connect(2)`` (``SO_PEERCRED`` on
its socket; the bus's own record of the connection on D-Bus), so a connection has the
identity of the process that made it.  :class:`Peer` has a small child process, running as
the user, connect (and, for a bus, authenticate) and hand the connected descriptor back over
``SCM_RIGHTS``: the benchmark or test then speaks on it directly, as that user, without a
process round trip per call.  The child stays alive while the connection is used, so the pid
the daemon recorded for it stays that user's.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self


@dataclass(frozen=True)
class Identity:
    """A Unix account: the credentials its connections carry."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def identity(name: str) -> Identity:
    """The account ``name`` as the user database has it now."""
    pw = pwd.getpwnam(name)
    return Identity(name, pw.pw_uid, pw.pw_gid, tuple(os.getgrouplist(name, pw.pw_gid)))


def ensure_group(name: str) -> int:
    """The gid of group ``name``, creating it as a system group if it does not exist (root)."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True)
        return grp.getgrnam(name).gr_gid


def ensure_user(name: str, groups: tuple[str, ...] = ()) -> Identity:
    """The system account ``name`` (no home, no login shell), created if missing, in
    ``groups`` (each created if missing).  Needs root."""
    for group in groups:
        ensure_group(group)
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin"]
            + ["--user-group", name],
            check=True,
        )
    if groups:
        subprocess.run(["usermod", "-a", "-G", ",".join(groups), name], check=True)
    return identity(name)


# Runs as the user, with the system's interpreter in isolated mode (nothing of the repo).
_CONNECTOR = r"""
import os, socket, sys
path, mode, chan = sys.argv[1], sys.argv[2], socket.socket(fileno=int(sys.argv[3]))
count = int(sys.argv[4])
conns = []
try:
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        conns.append(s)
    if mode == "dbus":
        # SASL EXTERNAL with our own uid, as every D-Bus client starts.
        s.sendall(b"\0AUTH EXTERNAL " + str(os.getuid()).encode().hex().encode() + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            part = s.recv(512)
            if not part:
                break
            reply += part
        if not reply.startswith(b"OK "):
            raise OSError("the bus refused authentication: %r" % reply)
        s.sendall(b"BEGIN\r\n")
except OSError as exc:
    chan.sendall(b"-" + str(exc).encode())
    sys.exit(1)
for i in range(0, len(conns), 200):
    socket.send_fds(chan, [b"+"], [c.fileno() for c in conns[i : i + 200]])
for c in conns:
    c.close()
sys.stdin.buffer.read()
"""


class PeerError(RuntimeError):
    """The child could not connect as the user."""


class Peer:
    """One connection to ``path`` made by ``who``; ``dbus=True`` also authenticates to a bus.

    ``fd`` is the connected descriptor (``fds``: all of them, with ``count`` > 1), owned by
    whoever takes it (:meth:`socket`, or a GLib socket); the child process ends when the
    ``with`` block (or :meth:`close`) ends.
    """

    def __init__(
        self, who: Identity, path: Path | str, *, dbus: bool = False, count: int = 1
    ) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                ["/usr/bin/python3", "-I", "-S", "-c", _CONNECTOR]
                + [str(path), "dbus" if dbus else "plain", str(theirs.fileno()), str(count)],
                user=who.uid,
                group=who.gid,
                extra_groups=list(who.groups),
                pass_fds=[theirs.fileno()],
                stdin=subprocess.PIPE,
                cwd="/",
            )
            theirs.close()
            ours.settimeout(30)
            fds: list[int] = []
            msg = b"+"
            while len(fds) < count and msg.startswith(b"+"):
                msg, got, _flags, _addr = socket.recv_fds(ours, 4096, 200)
                fds += got
                if not msg:
                    break
        except BaseException:
            ours.close()
            theirs.close()
            self.close()
            raise
        finally:
            ours.close()
        if len(fds) < count:
            for fd in fds:
                os.close(fd)
            self.close()
            raise PeerError(
                f"{who.name} could not connect to {path}: {msg[1:].decode(errors='replace')}"
            )
        #: Every connection made (``count`` of them); ``fd`` is the first.
        self.fds: list[int] = fds
        self.fd: int = fds[0]
        self.pid = self.proc.pid
        self.who = who

    def socket(self, timeout: float | None = 60.0) -> socket.socket:
        """The connection as a Python socket (which then owns the descriptor)."""
        sock = socket.socket(fileno=self.fd)
        sock.settimeout(timeout)
        return sock

    def close(self) -> None:
        """Let the child end (the connection itself is closed by its owner)."""
        proc = getattr(self, "proc", None)
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Dialer:
    """Opens connections to ``path`` as ``who``, one at a time: each call ends the previous
    connection's child and returns a new connection (the fuzzers' ``connect``)."""

    def __init__(self, who: Identity, path: Path | str, timeout: float | None = 60.0) -> None:
        self.who = who
        self.path = path
        self.timeout = timeout
        self.peer: Peer | None = None
        self.count = 0

    def __call__(self) -> socket.socket:
        """A new connection as ``who``."""
        self.close()
        self.peer = Peer(self.who, self.path)
        self.count += 1
        return self.peer.socket(self.timeout)

    def close(self) -> None:
        """End the child of the current connection."""
        if self.peer is not None:
            self.peer.close()
            self.peer = None


def rss(pid: int) -> dict[str, int]:
    """``VmRSS``, ``RssAnon`` and ``VmHWM`` of a process, in bytes (from /proc/PID/status)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


#: A Python traceback's first line, at the start of a log line (an escaped payload echoed by
#: an audit record cannot start a line).
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):$", re.M)
#: A record line of the daemon's stderr log, and one it logged at ERROR or CRITICAL.
_RECORD = re.compile(r"^aiosd\[\d+\]: ")
_ERROR_RECORD = re.compile(r"^aiosd\[\d+\]: (ERROR|CRITICAL) (.*)$")


def log_problems(text: str) -> list[str]:
    """Each error record and traceback in a daemon log, summarized on one line: the record,
    the innermost frame and the exception (pids and request ids left out, so that the same
    failure reads the same every time)."""
    found: list[str] = []
    block: list[str] | None = None

    def flush() -> None:
        if block:
            frames = [ln.strip() for ln in block if ln.startswith("  File ")]
            tail = [ln for ln in block[1:] if ln and not ln.startswith((" ", "Traceback"))]
            parts = [block[0]]
            if frames:
                parts.append(frames[-1])
            if tail:
                parts.append(tail[-1])
            found.append(" | ".join(parts))

    for line in text.splitlines():
        m = _ERROR_RECORD.match(line)
        if m or _TRACEBACK.match(line) and block is None:
            flush()
            block = [re.sub(r"request '?[\w-]+'? ", "request ", m.group(2)) if m else line]
        elif block is not None:
            if _RECORD.match(line):
                flush()
                block = None
            else:
                block.append(line)
    flush()
    return found


def tracebacks(text: str) -> int:
    """How many tracebacks a daemon log holds."""
    return len(_TRACEBACK.findall(text))

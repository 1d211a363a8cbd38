"""systemd integration that degrades silently where systemd is not PID 1.

sd_notify, socket activation and the journal come from systemd-python when it is importable;
without it (or without $NOTIFY_SOCKET / LISTEN_FDS / journald) each call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

try:
    from systemd import daemon as _daemon
except ImportError:  # pragma: no cover - systemd-python is a dependency; keep running without
    _daemon = None

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def notify(*fields: str) -> None:
    """Send ``KEY=VALUE`` fields to the service manager, if there is one."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    message = "\n".join(fields)
    if _daemon is not None:
        _daemon.notify(message)
        return
    _notify_fallback(message)


def _notify_fallback(message: str) -> None:
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), addr)


def reloading_fields() -> tuple[str, str]:
    """RELOADING=1 with the MONOTONIC_USEC systemd wants alongside it."""
    return "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2 / 1_000_000
    except ValueError:
        log.warning("ignoring invalid WATCHDOG_USEC=%r", usec)
        return None


def listen_socket() -> socket.socket | None:
    """The first socket passed by systemd socket activation, or None."""
    if _daemon is not None:
        fds = _daemon.listen_fds()
    else:
        fds = _listen_fds_fallback()
    if not fds:
        return None
    if len(fds) > 1:
        log.warning("got %d sockets from systemd; serving the first only", len(fds))
    return socket.socket(fileno=fds[0])


def _listen_fds_fallback() -> list[int]:
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return list(range(3, 3 + count))


def journal_available() -> bool:
    """Whether journald listens on this machine."""
    return _daemon is not None and os.path.exists(JOURNAL_SOCKET)


def stderr_is_journal() -> bool:
    """Whether systemd connected our stderr to the journal ($JOURNAL_STREAM matches)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)

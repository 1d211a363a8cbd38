"""What /proc says of a process, read without psutil where it is on a hot path.

``/proc/PID/stat`` is one line; the command name (field 2) is in parentheses and may itself
hold spaces and parentheses, so the fields are counted from the last ``)``.
"""

from __future__ import annotations

import dataclasses
import os

#: Clock ticks per second (utime, stime, starttime are in ticks).
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(frozen=True, slots=True)
class Stat:
    """The fields of /proc/PID/stat the daemon uses."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    #: CPU seconds of the process itself, and of its children it has waited for.
    cpu: float
    threads: int
    #: When the process started, in clock ticks since boot: with the pid, it names the
    #: process for good (a pid alone may be reused).
    start: int
    rss: int  # bytes


def stat(pid: int) -> Stat | None:
    """The process's stat, or None when there is no such process (any more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            line = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return parse(pid, line)


def parse(pid: int, line: bytes) -> Stat | None:
    """A stat line, parsed (None if it is not one)."""
    end = line.rfind(b")")
    f = line[end + 2 :].split()
    if end < 0 or len(f) < 22:
        return None
    return Stat(
        pid=pid,
        state=f[0].decode(),
        ppid=int(f[1]),
        pgrp=int(f[2]),
        session=int(f[3]),
        cpu=(int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])) / TICKS,
        threads=int(f[17]),
        start=int(f[19]),
        rss=int(f[21]) * PAGE,
    )


def all_stats() -> list[Stat]:
    """Every process's stat (those that end while they are read are left out)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            s = stat(int(name))
            if s is not None:
                out.append(s)
    return out

"""Process tools: views of the process table, and signals to the caller's own processes.

Listing and describing processes happens in the daemon (reading /proc needs no user's
rights), filtered to what the caller could see with ``ps``: every process, unless /proc is
mounted with ``hidepid=`` (then only their own, or all for members of its ``gid=`` group).
Only what ``/proc/PID/stat``, ``status`` and ``cmdline`` tell everyone is shown; what the
kernel keeps for the owner (working directory, executable) only for the caller's own
processes.  Signals are sent by the user's worker, as the user (:func:`signal_pid`): the
kernel decides whom they may signal.
"""

from __future__ import annotations

import os
import signal as signals
import time
from typing import Any

import psutil

#: Signals the tool sends, by name.
SIGNALS = ("TERM", "KILL", "INT", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT")
#: How long CPU use is sampled for a list sorted by CPU.
CPU_SAMPLE = 0.25
#: Characters of a command line shown in a list.
CMDLINE_CHARS = 200


def hidepid() -> tuple[bool, int | None]:
    """Whether /proc hides other users' processes, and the group exempt from it."""
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            mounts = f.read().splitlines()
    except OSError:
        return False, None
    for line in mounts:
        parts = line.split()
        if len(parts) >= 4 and parts[1] == "/proc" and parts[2] == "proc":
            opts = dict((o.split("=", 1) + [""])[:2] for o in parts[3].split(","))
            hidden = opts.get("hidepid", "0") not in ("0", "off")
            gid = int(opts["gid"]) if opts.get("gid", "").isdigit() else None
            return hidden, gid
    return False, None


def _visible(uid: int, groups: frozenset[int]) -> Any:
    hidden, gid = hidepid()
    if not hidden or uid == 0 or (gid is not None and gid in groups):
        return lambda p_uid: True
    return lambda p_uid: p_uid == uid


def _user(p: psutil.Process) -> str:
    try:
        return p.username()
    except (KeyError, psutil.Error):
        return "?"


def list_processes(
    uid: int,
    groups: frozenset[int],
    sort: str,
    limit: int,
    mine: bool,
    name: str | None,
) -> dict[str, Any]:
    """Processes the caller can see, sorted (``cpu``: CPU use over a short sample)."""
    see = _visible(uid, groups)
    attrs = ["pid", "name", "uids", "memory_info", "status", "create_time", "cmdline", "cpu_times"]
    first: dict[int, Any] = {}
    for p in psutil.process_iter(attrs):
        info = p.info
        if info["uids"] is None or not see(info["uids"].real):
            continue
        if mine and info["uids"].real != uid:
            continue
        if name is not None and name.lower() not in (info["name"] or "").lower():
            continue
        first[p.pid] = (p, info)
    cpu: dict[int, float] = {}
    if sort == "cpu":
        t0 = time.monotonic()
        time.sleep(CPU_SAMPLE)
        dt = time.monotonic() - t0
        for pid, (p, info) in first.items():
            try:
                now = p.cpu_times()
            except psutil.Error:
                continue
            before = info["cpu_times"]
            if before is not None:
                used = (now.user + now.system) - (before.user + before.system)
                cpu[pid] = round(100.0 * used / dt, 1)
    rows = []
    total = psutil.virtual_memory().total
    for pid, (p, info) in first.items():
        mem = info["memory_info"]
        cmd = " ".join(info["cmdline"] or []) or f"[{info['name']}]"
        rows.append(
            {
                "pid": pid,
                "user": _user(p),
                "name": info["name"],
                "status": info["status"],
                "cpu_percent": cpu.get(pid),
                "rss": mem.rss if mem else None,
                "memory_percent": round(100.0 * mem.rss / total, 2) if mem else None,
                "started": info["create_time"],
                "command": cmd[:CMDLINE_CHARS],
            }
        )
    keys = {
        "cpu": lambda r: -(r["cpu_percent"] or 0.0),
        "memory": lambda r: -(r["rss"] or 0),
        "pid": lambda r: r["pid"],
        "name": lambda r: (r["name"] or "", r["pid"]),
    }
    rows.sort(key=keys[sort])
    return {"processes": rows[:limit], "total": len(rows), "truncated": len(rows) > limit}


def process_info(uid: int, groups: frozenset[int], pid: int) -> dict[str, Any] | None:
    """One process as the caller may see it, or None when there is none they can see."""
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            uids = p.uids()
            if not _visible(uid, groups)(uids.real):
                return None
            mem = p.memory_info()
            times = p.cpu_times()
            out: dict[str, Any] = {
                "pid": pid,
                "ppid": p.ppid(),
                "user": _user(p),
                "name": p.name(),
                "command": p.cmdline(),
                "status": p.status(),
                "started": p.create_time(),
                "cpu_user_s": times.user,
                "cpu_system_s": times.system,
                "rss": mem.rss,
                "vms": mem.vms,
                "threads": p.num_threads(),
                "nice": p.nice(),
            }
            if uids.real == uid:
                # The owner's to know (readable by them through /proc too).
                for key, get in (("cwd", p.cwd), ("exe", p.exe)):
                    try:
                        out[key] = get()
                    except psutil.Error:
                        out[key] = None
            return out
    except psutil.NoSuchProcess:
        return None


def signal_pid(pid: int, signal: str) -> dict[str, Any]:
    """Send ``SIG<signal>`` to ``pid`` (in the worker: the kernel checks the user's right)."""
    sig = signals.Signals[f"SIG{signal}"]
    os.kill(pid, sig)
    return {"pid": pid, "signal": sig.name, "sent": True}

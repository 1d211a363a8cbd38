"""Agents of the daemon as it is shipped: aiosd.service under systemd, driven with aiosctl.

``test_agents_systemd.py`` drives the backend directly, as root, outside any sandbox.  Here
the units of ``packaging/`` are installed as a package would install them, ``aiosd.socket``
is started, and a real user in ``aios`` runs agents with ``aiosctl``: so the daemon starts
transient units from inside its own sandbox (``CapabilityBoundingSet=``, ``ProtectSystem=``,
``SystemCallFilter=``, ...), reads agents' output back from the journal, and knows an agent's
own syscalls from its cgroup.  Skipped where systemd is not PID 1 (``scripts/test-systemd``).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.skipif(
        not os.path.isdir("/run/systemd/system"),
        reason="needs systemd as PID 1 (no /run/systemd/system): run scripts/test-systemd",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="installs units and users: needs root"),
]

TOP = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
AIOSCTL = str(VENV_BIN / "aiosctl")
USER = "aiosd-sd-alice"

#: (file in the checkout, where a package puts it)
INSTALL = [
    ("packaging/systemd/aiosd.service", "/etc/systemd/system/aiosd.service"),
    ("packaging/systemd/aiosd.socket", "/etc/systemd/system/aiosd.socket"),
    ("packaging/systemd/aiosd.sysusers", "/etc/sysusers.d/aiosd.conf"),
    ("packaging/systemd/aiosd.tmpfiles", "/etc/tmpfiles.d/aiosd.conf"),
    ("packaging/dbus/org.aiosd.Daemon1.conf", "/usr/share/dbus-1/system.d/org.aiosd.Daemon1.conf"),
    ("etc/aiosd/aiosd.toml", "/etc/aiosd/aiosd.toml"),
]


def run(*argv: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(argv)}  -> {done.returncode}\n{done.stdout}{done.stderr}", end="")
    return done


def ok(*argv: str, timeout: float = 120.0) -> str:
    done = run(*argv, timeout=timeout)
    assert done.returncode == 0, f"{argv[0]} failed: {done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def daemon() -> Iterator[None]:
    """The shipped units installed and aiosd.socket listening; removed again afterwards."""
    # The service has PrivateTmp=yes: a checkout under /tmp is not there for its ExecStart=.
    assert not str(VENV_BIN).startswith(("/tmp/", "/var/tmp/")), (
        f"{VENV_BIN}: run this from a checkout outside /tmp and /var/tmp (PrivateTmp=yes)"
    )
    placed: list[Path] = []
    for src, dst in INSTALL:
        target = Path(dst)
        assert not target.exists(), f"{dst} exists already: not a throw-away machine?"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TOP / src, target)
        placed.append(target)
    binary = Path("/usr/bin/aiosd")  # the unit's ExecStart=
    assert not binary.exists(), "/usr/bin/aiosd exists already: not a throw-away machine?"
    binary.symlink_to(VENV_BIN / "aiosd")
    placed.append(binary)
    try:
        ok("systemd-sysusers")
        ok("systemd-tmpfiles", "--create", "/etc/tmpfiles.d/aiosd.conf")
        ok("systemctl", "reload", "dbus")
        ok("systemctl", "daemon-reload")
        ok("systemctl", "start", "aiosd.socket")
        if run("id", USER).returncode != 0:
            ok("useradd", "--create-home", "--groups", "aios", "--shell", "/bin/sh", USER)
        # The first client activates the service; the model loads slowly in an emulated VM.
        ok("runuser", "-u", USER, "--", AIOSCTL, "status", timeout=600)
        yield
    finally:
        run("systemctl", "stop", "aiosd.service", "aiosd.socket")
        run("journalctl", "-u", "aiosd.service", "--no-pager", "-p", "warning")
        for p in placed:
            p.unlink()
        run("systemctl", "daemon-reload")
        run("systemctl", "reload", "dbus")


def alice(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return run("runuser", "-u", USER, "--", AIOSCTL, *args, timeout=timeout)


def alice_json(*args: str) -> Any:
    done = alice("--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def show(unit: str, *props: str) -> dict[str, str]:
    out = ok("systemctl", "show", unit, *(f"-p{p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def until(what: str, check: Any, timeout: float = 60.0) -> Any:
    end = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.5)
    return got


def test_the_service_chose_the_systemd_backend(daemon: None) -> None:
    pid = show("aiosd.service", "MainPID")["MainPID"]
    assert pid != "0"
    # The daemon itself is the sandboxed unit's process, not something started here.
    cgroup = Path(f"/proc/{pid}/cgroup").read_text()
    assert "/system.slice/aiosd.service" in cgroup


def test_an_agent_is_a_limited_unit_of_its_owner(daemon: None) -> None:
    uid = pwd.getpwnam(USER).pw_uid
    a = alice_json(
        "agent", "run", "-d", "--memory-max", "192M", "--tasks-max", "24",
        "--cpu-weight", "40", "--", "/bin/sleep", "300",
    )  # fmt: skip
    aid, pid = a["aid"], a["pid"]
    unit = f"aiosd-agent-{aid}.service"
    try:
        assert a["backend"] == "systemd"
        props = show(unit, "User", "Slice", "MemoryMax", "TasksMax", "CPUWeight", "MainPID",
                     "NoNewPrivileges", "ActiveState")  # fmt: skip
        assert props == {
            "User": str(uid), "Slice": "aiosd-agents.slice", "MemoryMax": str(192 << 20),
            "TasksMax": "24", "CPUWeight": "40", "MainPID": str(pid),
            "NoNewPrivileges": "yes", "ActiveState": "active",
        }  # fmt: skip
        status = Path(f"/proc/{pid}/status").read_text()
        uids = next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1:]
        assert uids == [str(uid)] * 4
        assert f"/aiosd-agents.slice/{unit}" in Path(f"/proc/{pid}/cgroup").read_text()

        assert alice("agent", "suspend", aid).returncode == 0
        assert show(unit, "FreezerState")["FreezerState"] == "frozen"
        assert alice_json("agent", "info", aid)["state"] == "suspended"
        assert alice("agent", "resume", aid).returncode == 0
        assert show(unit, "FreezerState")["FreezerState"] == "running"

        assert alice("agent", "stop", aid).returncode == 0
        assert alice("agent", "wait", "--timeout", "60", aid).returncode == 128 + 15
        ended = alice_json("agent", "info", aid)
        assert (ended["state"], ended["signal"]) == ("killed", "SIGTERM"), ended
        assert show(unit, "LoadState")["LoadState"] == "not-found"
    finally:
        alice("agent", "kill", aid)


def test_logs_come_from_the_journal_and_own_calls_are_the_agents(daemon: None) -> None:
    # The agent asks the daemon who it is, as any agent would: through its AIOSD_SOCKET.
    script = f"echo first line; {AIOSCTL} --json call system.status; echo last line"
    a = alice_json("agent", "run", "-d", "--", "/bin/sh", "-c", script)
    aid = a["aid"]
    waited = alice_json("agent", "wait", "--timeout", "120", aid)
    print(waited)
    done = alice_json("agent", "info", aid)
    assert done["state"] == "exited" and done["exit_code"] == 0, done
    assert done["syscalls"] >= 1

    def lines() -> list[str]:
        got = alice("agent", "logs", "-n", "200", aid)
        return got.stdout.splitlines() if got.returncode == 0 else []

    out = until("the agent's last line in its logs", lambda: "last line" in lines() and lines())
    assert out[0] == "first line"
    status = json.loads("\n".join(out[1:-1]))
    assert status["caller_aid"] == aid
    # journald has them as the unit's: the daemon read them from there, not from a file.
    journal = ok("journalctl", "-u", f"aiosd-agent-{aid}.service", "-o", "cat", "--no-pager")
    assert "first line" in journal and "last line" in journal


def test_tools_run_as_the_user_under_the_unit(daemon: None) -> None:
    """The tool workers are children of the sandboxed service: setpriv works within its
    CapabilityBoundingSet= and SystemCallFilter=, and the kernel still decides."""
    home = Path(pwd.getpwnam(USER).pw_dir)
    listed = alice("--json", "tool", "call", "fs.list", "path=~", "hidden=true")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["output"]["path"] == str(home)
    denied = alice("tool", "call", "fs.read", "path=/etc/shadow")
    assert denied.returncode != 0 and "Permission denied (EACCES)" in denied.stderr
    # ProtectHome=read-only: the service's children see homes read-only (docs/tools.md).
    wrote = alice("tool", "call", "-y", "fs.write", "path=~/from-a-tool.txt", "content=x")
    assert wrote.returncode != 0 and "(EROFS)" in wrote.stderr, wrote.stderr
    uid = pwd.getpwnam(USER).pw_uid
    workers = [
        p for p in Path("/proc").iterdir()
        if p.name.isdigit() and b"aiosd.osbridge.worker" in _cmdline(p)
    ]  # fmt: skip
    assert workers, "no tool worker is running"
    for p in workers:
        status = (p / "status").read_text()
        assert f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}" in status
        assert "NoNewPrivs:\t1" in status


def _cmdline(p: Path) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""

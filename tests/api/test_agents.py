"""Agents are processes of their owner (issue 10), on the subprocess backend (this machine has
no systemd as PID 1; tests/systemd covers the systemd backend in a VM).

Real users: ``in`` (alice) and ``in2`` (bob) are members of ``aios``; the test itself is
root, an administrator.  Every connection of alice's and bob's is made by a process of theirs
(bench/peer.py), so the daemon sees their credentials from the kernel.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiosd.errors import InvalidParams, NotFound, PermissionDenied, QuotaExceeded
from aiosd.sdk import Client
from bench.peer import Peer, identity
from tests.conftest import UnixUser, run_as
from tests.support import Daemon, UserClient, wait_until, write_config

pytestmark = pytest.mark.e2e

#: A Python as any user can run it, the repo not on its path (what agents of users run).
PY = "/usr/bin/python3"
#: An agent program: call system.status on the daemon's socket, print the result's JSON.
STATUS = """
import json, os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["AIOSD_SOCKET"])
s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"system.status"}\\n')
print(s.makefile("rb").readline().decode(), end="", flush=True)
"""


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-agents-"))
    directory.chmod(0o755)
    config = write_config(
        directory,
        slots=1,
        extra="[agents]\nmax_agents_per_user = 6\nstop_timeout = 2.0\nwatch_interval = 0.05\n",
    )
    d = Daemon(directory, config)
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0, d.log()


@pytest.fixture
def users(daemon: Daemon, unix_users: dict[str, UnixUser]) -> Iterator[Any]:
    opened: list[UserClient] = []

    def open_(who: str) -> UserClient:
        c = UserClient(unix_users[who], daemon.socket_path, 120)
        opened.append(c)
        return c

    yield open_
    for c in opened:
        c.close()


def _running(pid: int, argv: list[str]) -> None:
    """Wait until the agent's main process runs its program (past the wrappers)."""

    def cmdline() -> list[str]:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]

    wait_until(lambda: cmdline() == argv, 10, f"{pid} to run {argv}", cmdline)


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _states(pid: int) -> dict[int, str]:
    """The state letter of every process in ``pid``'s session (not those that have ended and
    only wait to be reaped: orphans go to PID 1, which reaps them when it will)."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                raw = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            fields = raw[raw.rfind(b")") + 2 :].split()
            if int(fields[3]) == pid and fields[0] != b"Z":
                out[int(name)] = fields[0].decode()
    return out


def _wait_lines(c: UserClient, aid: str, n: int) -> list[str]:
    texts: list[str] = []

    def enough() -> bool:
        nonlocal texts
        texts = [line["text"] for line in c.call("agent.logs", {"aid": aid})["lines"]]
        return len(texts) >= n

    wait_until(enough, 30, f"{n} lines of output from agent {aid}", lambda: texts)
    return texts


# --- ownership and confinement -----------------------------------------------------------------


def test_an_agent_runs_as_its_owner_with_her_groups_confined(
    users: Any, unix_users: dict[str, UnixUser]
) -> None:
    alice = users("in")
    a = alice.call(
        "agent.spawn",
        {"argv": ["/bin/sh", "-c", "exec sleep 60"], "env": {"COLOUR": "green"}, "label": "nap"},
    )
    try:
        _running(a["pid"], ["sleep", "60"])
        me = unix_users["in"]
        st = _status(a["pid"])
        assert st["Uid"].split() == [str(me.uid)] * 4
        assert st["Gid"].split() == [str(me.gid)] * 4
        assert sorted(int(g) for g in st["Groups"].split()) == sorted(set(me.groups))
        assert st["NoNewPrivs"] == "1"
        assert st["CapEff"] == st["CapPrm"] == st["CapBnd"] == "0" * 16
        assert st["Umask"] == "0077"
        assert os.readlink(f"/proc/{a['pid']}/fd/0") == "/dev/null"
        env = dict(
            kv.split("=", 1)
            for kv in Path(f"/proc/{a['pid']}/environ").read_text().split("\0")
            if kv
        )
        assert env["AIOSD_AGENT_ID"] == a["aid"] and env["COLOUR"] == "green"
        assert env["HOME"] == f"/home/{me.name}" and env["USER"] == me.name
        assert not {k for k in env if k.startswith(("PYTHON", "VIRTUAL_ENV", "NOTIFY_SOCKET"))}
        stat_fields = Path(f"/proc/{a['pid']}/stat").read_bytes().rsplit(b")", 1)[1].split()
        assert int(stat_fields[3]) == a["pid"]  # a session of its own
        assert os.readlink(f"/proc/{a['pid']}/cwd") == f"/home/{me.name}"
        assert (a["user"], a["uid"], a["state"], a["label"]) == (me.name, me.uid, "running", "nap")
    finally:
        alice.call("agent.kill", {"aid": a["aid"]})


def test_a_setuid_binary_does_not_elevate_an_agent(
    users: Any, unix_users: dict[str, UnixUser]
) -> None:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-suid-"))
    directory.chmod(0o755)
    suid = directory / "id"
    shutil.copy("/usr/bin/id", suid)
    os.chown(suid, 0, 0)
    suid.chmod(0o4755)
    assert suid.stat().st_mode & stat.S_ISUID
    # The binary does elevate a process of alice's that may gain privileges: the check
    # below can fail.
    plain = run_as(unix_users["in"], f"import subprocess; subprocess.run([{str(suid)!r}])")
    assert "euid=0(root)" in plain.stdout, plain
    alice = users("in")
    a = alice.call("agent.spawn", {"argv": [str(suid)], "cwd": "/"})
    assert alice.call("agent.wait", {"aid": a["aid"], "timeout": 30})["exit_code"] == 0
    out = _wait_lines(alice, a["aid"], 1)
    assert "euid=" not in out[0] and out[0].startswith(f"uid={unix_users['in'].uid}("), out


def test_root_never_owns_an_agent_and_users_cannot_start_one_for_others(
    daemon: Daemon, users: Any
) -> None:
    with Client(daemon.socket_path) as root:
        with pytest.raises(InvalidParams, match="agents never run as root"):
            root.call("agent.spawn", {"argv": ["/bin/true"]})
        with pytest.raises(InvalidParams, match="agents never run as root"):
            root.call("agent.spawn", {"argv": ["/bin/true"], "user": 0})
    with pytest.raises(PermissionDenied, match="only administrators"):
        users("in").call("agent.spawn", {"argv": ["/bin/true"], "user": "aiosd-test-in2"})


# --- acting on an agent ------------------------------------------------------------------------


def test_stop_kill_suspend_and_resume_act_on_the_whole_agent(users: Any) -> None:
    alice = users("in")
    # A main process and a child of it.
    a = alice.call(
        "agent.spawn",
        {"argv": ["/bin/sh", "-c", "sleep 300 & echo started; wait"], "cwd": "/"},
    )
    pid = a["pid"]
    _wait_lines(alice, a["aid"], 1)
    wait_until(lambda: len(_states(pid)) == 2, 10, "the agent's child", lambda: _states(pid))
    assert set(_states(pid).values()) <= {"S", "R"}
    assert alice.call("agent.suspend", {"aid": a["aid"]})["state"] == "suspended"
    wait_until(lambda: set(_states(pid).values()) == {"T"}, 10, "stopped", lambda: _states(pid))
    assert alice.call("agent.resume", {"aid": a["aid"]})["state"] == "running"
    wait_until(lambda: "T" not in _states(pid).values(), 10, "thawed", lambda: _states(pid))
    # A signal to the whole agent: USR1 ends sh and its sleep (neither catches it).
    alice.call("agent.kill", {"aid": a["aid"], "signal": "USR1"})
    done = alice.call("agent.wait", {"aid": a["aid"], "timeout": 30})
    assert (done["state"], done["signal"], done["ended_in_time"]) == ("killed", "SIGUSR1", True)
    assert _states(pid) == {}
    # stop: SIGTERM first; a program that ignores it gets SIGKILL after the grace period.
    b = alice.call(
        "agent.spawn", {"argv": ["/bin/sh", "-c", "trap '' TERM; echo up; sleep 300"], "cwd": "/"}
    )
    _wait_lines(alice, b["aid"], 1)
    t0 = time.monotonic()
    ended = alice.call("agent.stop", {"aid": b["aid"], "timeout": 0.5})
    assert time.monotonic() - t0 >= 0.5
    assert (ended["state"], ended["signal"]) == ("killed", "SIGKILL")
    assert ended["reason"].startswith("stopped by its owner")
    assert _states(b["pid"]) == {}


def test_another_user_cannot_see_or_touch_an_agent_and_an_admin_can(
    daemon: Daemon, users: Any
) -> None:
    alice, bob = users("in"), users("in2")
    a = alice.call("agent.spawn", {"argv": ["/bin/sh", "-c", "echo secret; sleep 300"]})
    aid = a["aid"]
    _wait_lines(alice, aid, 1)
    nobody = secrets.token_hex(6)
    for method, extra in (
        ("agent.info", {}),
        ("agent.stop", {}),
        ("agent.kill", {"signal": "KILL"}),
        ("agent.suspend", {}),
        ("agent.resume", {}),
        ("agent.logs", {"tail": 10}),
        ("agent.wait", {"timeout": 0}),
    ):
        with pytest.raises(NotFound) as theirs:
            bob.call(method, {"aid": aid, **extra})
        with pytest.raises(NotFound) as none:
            bob.call(method, {"aid": nobody, **extra})
        # Word for word what an AID nobody has gets: nothing tells that it exists.
        assert theirs.value.message == none.value.message.replace(nobody, aid), method
    assert aid not in {x["aid"] for x in bob.call("agent.list")["agents"]}
    assert alice.call("agent.info", {"aid": aid})["state"] == "running"
    with Client(daemon.socket_path) as root:
        assert aid in {x["aid"] for x in root.call("agent.list")["agents"]}
        stopped = root.call("agent.stop", {"aid": aid})
    assert stopped["state"] == "killed" and stopped["reason"].startswith("stopped by an admin")


# --- identity on every syscall -----------------------------------------------------------------


def test_an_agents_syscalls_are_its_own_and_a_claimed_aid_is_nothing(
    daemon: Daemon, users: Any, unix_users: dict[str, UnixUser]
) -> None:
    alice = users("in")
    # The agent asks itself, and so does a child it starts in a session of its own.
    child = (
        f"import subprocess, sys; subprocess.run([{PY!r}, '-c', sys.argv[1]], "
        "start_new_session=True)"
    )
    a = alice.call(
        "agent.spawn",
        {"argv": ["/bin/sh", "-c", f'{PY} -c "$1"; {PY} -c "$2" "$1"', "sh", STATUS, child]},
    )
    done = alice.call("agent.wait", {"aid": a["aid"], "timeout": 60})
    assert done["exit_code"] == 0, _wait_lines(alice, a["aid"], 0)
    out = [json.loads(t)["result"] for t in _wait_lines(alice, a["aid"], 2)]
    assert [r["caller_aid"] for r in out] == [a["aid"], a["aid"]]
    assert done["syscalls"] == 2
    # A process of alice's that only claims the AID is nobody's agent.
    claim = STATUS.replace('os.environ["AIOSD_SOCKET"]', repr(str(daemon.socket_path)))
    env_claim = f"import os; os.environ['AIOSD_AGENT_ID'] = {a['aid']!r}\n" + claim
    plain = run_as(unix_users["in"], env_claim)
    assert json.loads(plain.stdout)["result"]["caller_aid"] is None
    assert alice.call("system.status")["caller_aid"] is None
    # The audit record carries the agent's AID.
    assert f"system.status uid={unix_users['in'].uid} pid=" in daemon.log()
    assert f"aid={a['aid']} verdict=ok" in daemon.log()


ADD_TWO = """
import json, os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["AIOSD_SOCKET"])
f = s.makefile("rb")
for i, pinned in ((1, False), (2, True)):
    params = {"content": f"note {i}", "pinned": pinned}
    frame = {"jsonrpc": "2.0", "id": i, "method": "memory.add", "params": params}
    s.sendall(json.dumps(frame).encode() + b"\\n")
    print(f.readline().decode(), end="", flush=True)
"""


def test_an_agents_memory_is_its_own_and_ends_with_it_but_for_pinned_entries(
    users: Any,
) -> None:
    alice = users("in")
    a = alice.call("agent.spawn", {"argv": [PY, "-c", ADD_TWO]})
    alice.call("agent.wait", {"aid": a["aid"], "timeout": 60})
    added = [json.loads(t)["result"] for t in _wait_lines(alice, a["aid"], 2)]
    assert {r["space"] for r in added} == {a["memory_space"]} == {f"agent-{a['aid']}"}
    space = a["memory_space"]

    def unpinned_gone() -> bool:
        try:
            alice.call("memory.get", {"id": added[0]["id"], "space": space})
        except NotFound:
            return True
        return False

    # As a closed session's: unpinned entries go with the agent, pinned ones stay.
    wait_until(unpinned_gone, 10, "the ended agent's unpinned entry to go")
    kept = alice.call("memory.get", {"id": added[1]["id"], "space": space})
    assert (kept["content"], kept["pinned"]) == ("note 2", True)


ADD_MANY = """
import json, os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["AIOSD_SOCKET"])
f = s.makefile("rb")
for i in range(1, 11):
    frame = {"jsonrpc": "2.0", "id": i, "method": "memory.add", "params": {"content": "m" * 1000}}
    s.sendall(json.dumps(frame).encode() + b"\\n")
    print(f.readline().decode(), end="", flush=True)
"""


def test_an_agents_memory_budget_bounds_its_space(users: Any) -> None:
    alice = users("in")
    budget = 4 * 1024
    a = alice.call("agent.spawn", {"argv": [PY, "-c", ADD_MANY], "memory_budget": budget})
    assert alice.call("agent.wait", {"aid": a["aid"], "timeout": 60})["exit_code"] == 0
    results = [json.loads(t)["result"] for t in _wait_lines(alice, a["aid"], 10)]
    # Each entry is counted as its 1000 bytes plus 480 of overhead, the space as 576: two
    # entries fit in 4 KiB, and each add beyond moves the oldest one to storage.
    assert [r["evicted"] for r in results] == [[], []] + [[i] for i in range(1, 9)]
    # Without a budget the space holds them all.
    b = alice.call("agent.spawn", {"argv": [PY, "-c", ADD_MANY]})
    assert alice.call("agent.wait", {"aid": b["aid"], "timeout": 60})["exit_code"] == 0
    plain = [json.loads(t)["result"] for t in _wait_lines(alice, b["aid"], 10)]
    assert [r["evicted"] for r in plain] == [[]] * 10


# --- limits ------------------------------------------------------------------------------------


HOG = """
import time
chunks = []
while True:
    chunks.append(bytearray(8 * 1024 * 1024))  # zero-filled: every page touched
    time.sleep(0.01)
"""


def test_a_memory_hog_is_killed_at_its_limit_and_the_reason_reported(users: Any) -> None:
    alice = users("in")
    limit = 64 * 1024 * 1024
    a = alice.call("agent.spawn", {"argv": [PY, "-c", HOG], "limits": {"memory_max": limit}})
    done = alice.call("agent.wait", {"aid": a["aid"], "timeout": 60})
    assert (done["state"], done["signal"]) == ("killed", "SIGKILL"), done
    assert done["reason"].startswith("memory limit:"), done["reason"]
    assert "memory_max 65536 KiB" in done["reason"]
    # Killed within one look (50 ms here) of going over: at most a few chunks beyond.
    assert limit < done["max_rss"] < limit + 48 * 1024 * 1024, done["max_rss"]
    assert alice.call("agent.info", {"aid": a["aid"]})["reason"] == done["reason"]


def test_limits_beyond_the_configured_ones_and_too_many_agents_are_refused(
    users: Any,
) -> None:
    alice = users("in")
    with pytest.raises(InvalidParams, match="limits.memory_max"):
        alice.call("agent.spawn", {"argv": ["/bin/true"], "limits": {"memory_max": 0}})
    with pytest.raises(InvalidParams, match="limits.memory_max"):
        alice.call("agent.spawn", {"argv": ["/bin/true"], "limits": {"memory_max": 1 << 40}})
    with pytest.raises(InvalidParams, match="cpu_weight"):
        alice.call("agent.spawn", {"argv": ["/bin/true"], "limits": {"cpu_weight": 200}})
    with pytest.raises(InvalidParams, match="AIOSD_AGENT_ID"):
        alice.call("agent.spawn", {"argv": ["/bin/true"], "env": {"AIOSD_AGENT_ID": "x"}})
    with pytest.raises(InvalidParams, match="args go with name"):
        alice.call("agent.spawn", {"argv": ["/bin/echo"], "args": ["x"]})
    started = []
    try:
        for _ in range(6):
            started.append(alice.call("agent.spawn", {"argv": ["/bin/sleep", "300"]})["aid"])
        with pytest.raises(QuotaExceeded, match="agents.max_agents_per_user") as over:
            alice.call("agent.spawn", {"argv": ["/bin/sleep", "300"]})
        assert over.value.data["value"] == 6
    finally:
        for aid in started:
            alice.call("agent.kill", {"aid": aid})
    nice = alice.call("agent.spawn", {"argv": ["/bin/sleep", "300"], "limits": {"cpu_weight": 10}})
    try:
        _running(nice["pid"], ["/bin/sleep", "300"])
        # CFS weights fall by 1.25 per nice step: a tenth of the share is nice 10.
        assert (
            Path(f"/proc/{nice['pid']}/stat").read_bytes().rsplit(b")", 1)[1].split()[16] == b"10"
        )
    finally:
        alice.call("agent.kill", {"aid": nice["aid"]})


def test_a_program_that_cannot_start_fails_with_the_reason(users: Any) -> None:
    alice = users("in")
    a = alice.call("agent.spawn", {"argv": ["/nonexistent/program"], "cwd": "/"})
    done = alice.call("agent.wait", {"aid": a["aid"], "timeout": 30})
    assert done["state"] == "failed" and done["exit_code"] == 127
    assert (
        done["reason"].startswith("could not start:") and "/nonexistent/program" in done["reason"]
    )
    private = Path(tempfile.mkdtemp(prefix="aiosd-private-"))  # 0700, root's
    b = alice.call("agent.spawn", {"argv": ["/bin/true"], "cwd": str(private)})
    done = alice.call("agent.wait", {"aid": b["aid"], "timeout": 30})
    assert done["state"] == "failed" and "Permission denied" in done["reason"], done


# --- logs --------------------------------------------------------------------------------------


def test_logs_tail_and_follow(daemon: Daemon, unix_users: dict[str, UnixUser]) -> None:
    program = "for i in 1 2 3; do echo line $i; sleep 0.2; done; echo oops >&2"
    with Peer(identity(unix_users["in"].name), daemon.socket_path) as peer:
        sock = peer.socket(timeout=60)
        f = sock.makefile("rb")

        def send(i: int, method: str, params: dict[str, Any]) -> None:
            frame = {"jsonrpc": "2.0", "id": i, "method": method, "params": params}
            sock.sendall(json.dumps(frame).encode() + b"\n")

        send(1, "agent.spawn", {"argv": ["/bin/sh", "-c", program], "cwd": "/"})
        aid = json.loads(f.readline())["result"]["aid"]
        send(2, "agent.logs", {"aid": aid, "tail": 0, "stream": True})
        notes, result = [], None
        while result is None:
            msg = json.loads(f.readline())
            if msg.get("method") == "stream":
                notes.append(msg["params"])
            elif msg.get("id") == 2:
                result = msg["result"]
        sock.close()
    texts = [(n["stream"], n["content"]) for n in notes]
    assert texts == [("stdout", f"line {i}") for i in (1, 2, 3)] + [("stderr", "oops")]
    assert [n["seq"] for n in notes] == [0, 1, 2, 3]
    assert (result["followed"], result["dropped"], result["lines"]) == (4, 0, [])


def _follow(daemon: Daemon, user: UnixUser, aid: str) -> tuple[list[Any], Any]:
    """``agent.logs`` with stream=true as ``user``: its notifications and its result."""
    with Peer(identity(user.name), daemon.socket_path) as peer:
        sock = peer.socket(timeout=60)
        f = sock.makefile("rb")
        frame = {"jsonrpc": "2.0", "id": 1, "method": "agent.logs"}
        frame["params"] = {"aid": aid, "tail": 10, "stream": True}
        sock.sendall(json.dumps(frame).encode() + b"\n")
        notes, result = [], None
        while result is None:
            msg = json.loads(f.readline())
            if msg.get("method") == "stream":
                notes.append(msg["params"])
            else:
                result = msg["result"]
        sock.close()
    return notes, result


def test_following_gives_the_kept_lines_then_the_new_ones_each_once(
    daemon: Daemon, users: Any, unix_users: dict[str, UnixUser]
) -> None:
    alice = users("in")
    a = alice.call("agent.spawn", {"argv": ["/bin/sh", "-c", "echo a; sleep 1; echo b"]})
    _wait_lines(alice, a["aid"], 1)
    notes, result = _follow(daemon, unix_users["in"], a["aid"])
    assert [(n["seq"], n["content"]) for n in notes] == [(0, "a"), (1, "b")]
    assert [x["text"] for x in result["lines"]] == ["a"] and result["followed"] == 1
    # Once it has ended, following gives the kept lines the same way, and ends.
    alice.call("agent.wait", {"aid": a["aid"], "timeout": 30})
    notes, result = _follow(daemon, unix_users["in"], a["aid"])
    assert [(n["seq"], n["content"]) for n in notes] == [(0, "a"), (1, "b")]
    assert [x["text"] for x in result["lines"]] == ["a", "b"] and result["followed"] == 0


# --- records -----------------------------------------------------------------------------------


def test_agents_are_stopped_with_the_daemon_and_their_records_kept(
    unix_users: dict[str, UnixUser],
) -> None:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-agents-restart-"))
    directory.chmod(0o755)
    config = write_config(directory, slots=1, extra="[agents]\nstop_timeout = 1.0\n")
    d = Daemon(directory, config)
    d.wait_ready()
    try:
        with Client(d.socket_path) as root:
            a = root.call("agent.spawn", {"argv": ["/bin/sleep", "300"], "user": "aiosd-test-in"})
            b = root.call("agent.spawn", {"argv": ["/bin/true"], "user": "aiosd-test-in"})
            root.call("agent.wait", {"aid": b["aid"], "timeout": 30})
    finally:
        assert d.stop() == 0, d.log()
    assert not Path(f"/proc/{a['pid']}").exists()
    records = directory / "state" / "agents.sqlite"
    assert stat.S_IMODE(records.stat().st_mode) == 0o600
    again = Daemon(directory, config)
    again.wait_ready()
    try:
        with Client(again.socket_path) as root:
            first = root.call("agent.info", {"aid": a["aid"]})
            assert (first["state"], first["signal"]) == ("killed", "SIGTERM")
            assert first["reason"].startswith("the daemon stopped")
            assert root.call("agent.info", {"aid": b["aid"]})["exit_code"] == 0
    finally:
        assert again.stop() == 0, again.log()


def test_an_agent_left_running_by_a_killed_daemon_is_gone_and_reported_lost(
    unix_users: dict[str, UnixUser],
) -> None:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-agents-lost-"))
    directory.chmod(0o755)
    config = write_config(directory, slots=1)
    d = Daemon(directory, config)
    d.wait_ready()
    with Client(d.socket_path) as root:
        a = root.call("agent.spawn", {"argv": ["/bin/sleep", "300"], "user": "aiosd-test-in"})
    d.proc.send_signal(signal.SIGKILL)
    d.stop()  # reaps it, and ends the test's own readers of it
    # The parent-death signal ends it with the daemon.
    wait_until(lambda: not Path(f"/proc/{a['pid']}").exists(), 10, "the agent to die")
    again = Daemon(directory, config)
    again.wait_ready()
    try:
        with Client(again.socket_path) as root:
            lost = root.call("agent.info", {"aid": a["aid"]})
        assert lost["state"] == "lost" and "daemon stopped while it ran" in lost["reason"]
    finally:
        assert again.stop() == 0, again.log()


def test_status_names_the_backend(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as root:
        st = root.call("system.status")
    assert st["agents_backend"] == "subprocess" and st["caller_aid"] is None

"""``aiosctl agent …`` end to end: the real command against a real daemon, with a real user.

The test runs as root, an administrator; root cannot own agents, so every agent is started
with ``--user aiosd-test-in`` (a member of ``aios``) and runs as that user.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from aiosd.cli.main import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_TEMPFAIL, EXIT_USAGE
from tests.conftest import USER_IN, UnixUser
from tests.support import REPO, Daemon, PrivateBus, wait_until, write_config

pytestmark = pytest.mark.e2e

AGENTS = "[agents]\nmax_agents_per_user = 8\nstop_timeout = 2.0\nwatch_interval = 0.05\n"
AID = re.compile(r"^[0-9a-f]{12}$")
#: Well formed, and nobody's.
NO_SUCH_AID = "0123456789ab"


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-cli-agents-"))
    directory.chmod(0o755)
    d = Daemon(directory, write_config(directory, slots=1, extra=AGENTS))
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0, d.log()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AIOSD_SOCKET", "COLUMNS")}
    return {**env, **extra}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "aiosd.cli", *args]


class Ctl:
    """Runs the real aiosctl against the module's daemon."""

    def __init__(self, daemon: Daemon, users: dict[str, UnixUser]) -> None:
        self.socket = str(daemon.socket_path)
        self.user = users["in"]
        assert self.user.name == USER_IN

    def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _cmd("--socket", self.socket, *args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env=_env(),
        )

    def ok(self, *args: str) -> str:
        out = self(*args)
        assert out.returncode == 0, (args, out.returncode, out.stderr)
        return out.stdout

    def detach(self, *command: str, label: str | None = None) -> str:
        """Start ``command`` as the test user's agent; its AID."""
        extra = ["--label", label] if label else []
        aid = self.ok("agent", "run", "--detach", "--user", self.user.name, *extra, "--", *command)
        assert AID.match(aid.strip()), aid
        return aid.strip()

    def logs(self, aid: str, want: str) -> str:
        """``agent logs`` once ``want`` is in them."""
        seen = ""

        def there() -> bool:
            nonlocal seen
            seen = self.ok("agent", "logs", aid)
            return want in seen

        wait_until(there, 30, f"{want!r} in the logs of {aid}", lambda: seen)
        return seen


@pytest.fixture
def ctl(daemon: Daemon, unix_users: dict[str, UnixUser]) -> Ctl:
    return Ctl(daemon, unix_users)


def test_run_in_the_foreground_prints_the_output_and_exits_with_the_agents_status(
    ctl: Ctl,
) -> None:
    out = ctl("agent", "run", "--user", USER_IN, "--", "/bin/sh", "-c", "echo hi; exit 3")
    assert out.returncode == 3, out.stderr
    assert out.stdout == "hi\n"
    assert re.search(r"aiosctl: agent [0-9a-f]{12}: exited with status 3$", out.stderr, re.M)

    out = ctl("agent", "run", "--user", USER_IN, "--", "/bin/sh", "-c", "echo out; echo err >&2")
    assert (out.returncode, out.stdout, out.stderr) == (0, "out\n", "err\n")

    # Killed by a signal: 128 + its number, as a shell says it.
    out = ctl("agent", "run", "--user", USER_IN, "--", "/bin/sh", "-c", "kill -KILL $$")
    assert out.returncode == 128 + signal.SIGKILL, out.stderr
    assert "killed by SIGKILL" in out.stderr

    # Options reach the agent: its environment, directory and limits.
    out = ctl(
        "agent",
        "run",
        "--user",
        USER_IN,
        "--env",
        "COLOUR=green",
        "--cwd",
        "/tmp",
        "--memory-max",
        "256M",
        "--runtime-max",
        "1m",
        "--label",
        "env-check",
        "--",
        "/bin/sh",
        "-c",
        'echo "$COLOUR $(pwd) $USER"',
    )
    assert (out.returncode, out.stdout) == (0, f"green /tmp {USER_IN}\n"), out.stderr


def test_detach_ps_logs_info_stop_and_wait(ctl: Ctl) -> None:
    aid = ctl.detach("/bin/sh", "-c", "echo started; exec sleep 60", label="cli-nap")
    ps = ctl.ok("agent", "ps")
    header, *rows = ps.splitlines()
    assert header.split() == ["AID", "USER", "STATE", "PID", "CPU", "RSS", "TOKENS", "AGE", "LABEL"]
    row = next(r.split() for r in rows if r.startswith(aid))
    assert row[1:3] == [USER_IN, "running"] and row[-1] == "cli-nap"
    listed = json.loads(ctl.ok("agent", "ps", "--json"))
    assert aid in [a["aid"] for a in listed["agents"]]

    assert ctl.logs(aid, "started") == "started\n"
    info = ctl.ok("agent", "info", aid)
    fields = dict(line.split(":", 1) for line in info.splitlines())
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields["AID"] == aid and fields["State"] == "running"
    assert fields["User"] == f"{USER_IN} (uid {ctl.user.uid})"
    assert fields["Command"] == "/bin/sh -c 'echo started; exec sleep 60'"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$", fields["Started"])
    assert fields["Ended"] == "-" and fields["Memory limit"]
    # A unique start of the AID names it too.
    assert ctl.ok("agent", "info", aid[:6]).startswith(f"AID:             {aid}\n")

    out = ctl("agent", "wait", "--timeout", "0.2", aid)
    assert out.returncode == EXIT_TEMPFAIL and "still running" in out.stderr

    assert ctl.ok("agent", "stop", aid) == f"{aid}\n"
    out = ctl("agent", "wait", aid)
    assert (out.returncode, out.stdout) == (128 + signal.SIGTERM, f"{128 + signal.SIGTERM}\n")
    assert "killed by SIGTERM" in out.stderr

    assert aid not in ctl.ok("agent", "ps")
    row = next(r.split() for r in ctl.ok("agent", "ps", "-a").splitlines() if r.startswith(aid))
    assert row[1:4] == [USER_IN, "killed(TERM)", "-"]
    info = ctl.ok("agent", "info", aid)
    assert re.search(r"^Exit status: +143 \(killed by SIGTERM\)$", info, re.M), info
    assert re.search(r"^Reason: +stopped by .*killed by SIGTERM$", info, re.M), info
    assert json.loads(ctl.ok("agent", "info", "--json", aid))["state"] == "killed"


def test_logs_follow_until_the_agent_ends(ctl: Ctl) -> None:
    aid = ctl.detach("/bin/sh", "-c", "echo one; sleep 1; echo two; echo three >&2")
    ctl.logs(aid, "one")
    out = ctl("agent", "logs", "-f", aid)
    assert (out.returncode, out.stdout, out.stderr) == (0, "one\ntwo\n", "three\n")
    # Ended: the whole output, the last lines only, with times.
    assert ctl.ok("agent", "logs", "-n", "1", aid) == ""  # "three" went to stderr
    stamped = ctl("agent", "logs", "-t", aid)
    assert re.match(r"^\d{4}-\d\d-\d\dT[\d:.]+[+-]\d\d:\d\d one$", stamped.stdout.splitlines()[0])
    assert ctl("agent", "wait", aid).returncode == 0


def test_suspend_resume_and_kill(ctl: Ctl) -> None:
    aid = ctl.detach("/bin/sleep", "60")
    assert ctl.ok("agent", "suspend", aid) == f"{aid}\n"
    assert "State:           suspended" in ctl.ok("agent", "info", aid)
    assert ctl.ok("agent", "resume", aid) == f"{aid}\n"
    assert "State:           running" in ctl.ok("agent", "info", aid)
    assert ctl.ok("agent", "kill", "-s", "term", aid) == f"{aid}\n"
    assert ctl("agent", "wait", aid).returncode == 128 + signal.SIGTERM


def test_ctrl_c_stops_the_agent_and_exits_130(ctl: Ctl) -> None:
    proc = subprocess.Popen(
        _cmd("--socket", ctl.socket, "agent", "run", "--user", USER_IN, "--label", "ctrl-c")
        + ["--", "/bin/sh", "-c", "echo go; exec sleep 60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=_env(),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "go\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_INTERRUPTED, err
    aid = re.search(r"stopping agent ([0-9a-f]{12})", err)
    assert aid, err
    assert json.loads(ctl.ok("agent", "info", "--json", aid.group(1)))["state"] == "killed"


def test_a_missing_agent_is_not_found(ctl: Ctl) -> None:
    for verb in ("info", "stop", "wait", "logs", "kill", "suspend"):
        out = ctl("agent", verb, NO_SUCH_AID)
        assert out.returncode == EXIT_FAILURE, (verb, out.stderr)
        assert out.stderr == f"aiosctl: no agent '{NO_SUCH_AID}'\n", verb
    out = ctl("agent", "info", "not-an-aid")
    assert out.returncode == EXIT_USAGE and "is not an agent id" in out.stderr
    # The others are still done; the status is that of the failure.
    aid = ctl.detach("/bin/true")
    out = ctl("agent", "info", NO_SUCH_AID, aid)
    assert out.returncode == EXIT_FAILURE and f"AID:             {aid}" in out.stdout


def test_available_lists_the_installed_agents(ctl: Ctl) -> None:
    out = ctl("agent", "available")
    assert out.returncode == 0, out.stderr
    found = json.loads(ctl.ok("agent", "available", "--json"))["agents"]
    lines = out.stdout.splitlines()
    if found:
        assert lines[0].split() == ["NAME", "SOURCE", "DESCRIPTION"]
        for m in found:
            assert any(line.split()[:2] == [m["name"], m["source"]] for line in lines[1:])


# --- over D-Bus ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bus_daemon(private_bus: PrivateBus) -> Iterator[Daemon]:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-cli-agents-bus-"))
    directory.chmod(0o755)
    config = write_config(directory, slots=1, extra=AGENTS, dbus_address=private_bus.address)
    d = Daemon(directory, config)
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0, d.log()


def test_the_agent_verbs_over_the_bus(
    private_bus: PrivateBus, bus_daemon: Daemon, unix_users: dict[str, UnixUser]
) -> None:
    def bus(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _cmd("--bus", *args),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env=_env(DBUS_SYSTEM_BUS_ADDRESS=private_bus.address),
        )

    out = bus("agent", "run", "--detach", "--user", USER_IN, "--", "/bin/sh", "-c", "exec sleep 60")
    assert out.returncode == 0, out.stderr
    aid = out.stdout.strip()
    assert AID.match(aid), out.stdout
    try:
        out = bus("agent", "ps")
        assert out.returncode == 0, out.stderr
        assert any(r.split()[:3] == [aid, USER_IN, "running"] for r in out.stdout.splitlines())
        out = bus("agent", "info", aid)
        assert out.returncode == 0 and f"User:            {USER_IN} " in out.stdout, out
        # Following output needs the socket; said before anything is started.
        out = bus("agent", "run", "--user", USER_IN, "--", "/bin/true")
        assert out.returncode == EXIT_USAGE and "--bus cannot follow" in out.stderr
        out = bus("agent", "logs", "-f", aid)
        assert out.returncode == EXIT_USAGE and "--bus cannot follow" in out.stderr
        out = bus("agent", "info", NO_SUCH_AID)
        assert (out.returncode, out.stderr) == (
            EXIT_FAILURE,
            f"aiosctl: no agent '{NO_SUCH_AID}'\n",
        )
    finally:
        out = bus("agent", "stop", aid)
    assert (out.returncode, out.stdout) == (0, f"{aid}\n"), out.stderr
    out = bus("agent", "wait", aid)
    assert out.returncode == 128 + signal.SIGTERM, out.stderr
    assert aid not in bus("agent", "ps").stdout

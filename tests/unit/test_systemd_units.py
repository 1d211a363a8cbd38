"""Checks of the systemd files in packaging/systemd/.

``systemd-analyze verify`` is run on the unit files exactly as shipped and any line it
prints fails the test: verify reports many problems (unknown keys, unparsable values) as
"..., ignoring" warnings while still exiting 0, so the exit status alone proves nothing.

verify also insists that every Exec*= binary exists, and /usr/bin/aiosd does not exist on a
development machine. Rather than rewriting the unit, verify runs with --root= on a
throw-away root that holds: the units under /etc/systemd/system, a copy of the host's
/usr/lib/systemd/system (for sockets.target, multi-user.target and what they pull in), an
executable stub at /usr/bin/aiosd (verify only checks that the path is an executable file),
and copies of the host's other Exec*= binaries (/bin/kill). A binary the host lacks is not
faked, so verify still reports it. --root= also keeps drop-ins in the host's /etc out.

Measured on Debian 12 (systemd 252, which is not PID 1 here): verify prints nothing for the
shipped units, so no output at all is tolerated.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT_DIR = REPO / "packaging" / "systemd"
SERVICE = UNIT_DIR / "aiosd.service"
SOCKET = UNIT_DIR / "aiosd.socket"
SYSUSERS = UNIT_DIR / "aiosd.sysusers"
TMPFILES = UNIT_DIR / "aiosd.tmpfiles"

DAEMON_BINARY = "/usr/bin/aiosd"
HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
# Exposure score of aiosd.service from `systemd-analyze security --offline=true` as measured
# on systemd 252 (docs/systemd.md). Loosening the sandbox must be a conscious change here.
EXPOSURE_BUDGET = 2.3

Unit = dict[str, list[tuple[str, str]]]


# ---- helpers ----------------------------------------------------------------------------


def parse_unit(text: str) -> Unit:
    """Sections of a unit file as ordered (key, value) lists; keys may repeat."""
    sections: Unit = {}
    current: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: continuation lines are not parsed here"
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"line {number}: not KEY=VALUE in a section: {raw!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every value of KEY in SECTION, in file order (empty list if absent)."""
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str:
    """The single value of KEY in SECTION."""
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= expected once, found {found!r}"
    return found[0]


def words(unit: Unit, section: str, key: str) -> list[str]:
    """All space-separated words of every KEY= line in SECTION."""
    return [word for v in values(unit, section, key) for word in v.split()]


def exec_binary(command_line: str) -> str:
    """The program of an Exec*= line, without systemd's "-@:+!" prefixes."""
    return command_line.split()[0].lstrip("-@:+!")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def systemd_version() -> int:
    first = subprocess.run(
        [tool("systemd-analyze"), "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    match = re.match(r"systemd (\d+)", first)
    assert match, first
    return int(match.group(1))


def run(argv: list[str]) -> tuple[int, list[str]]:
    """Run a systemd tool; return its exit status and every non-empty output line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    env["LC_ALL"] = "C"
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    return proc.returncode, lines


def fake_root(base: Path, units: dict[str, str]) -> Path:
    """A root directory in which `systemd-analyze verify --root=` can check UNITS."""
    root = base / "root"
    host_units = next((d for d in HOST_UNIT_DIRS if d.is_dir()), None)
    if host_units is None:
        pytest.skip("no systemd unit directory on this host")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name, text in units.items():
        (unit_dir / name).write_text(text)
        for section in parse_unit(text).values():
            for key, command_line in section:
                if not key.startswith("Exec") or not command_line:
                    continue
                binary = exec_binary(command_line)
                target = root / binary.lstrip("/")
                if not binary.startswith("/") or target.exists():
                    continue
                if binary == DAEMON_BINARY:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(
                        "#!/bin/sh\n# stand-in for the aiosd console script (test only)\nexit 1\n"
                    )
                    target.chmod(0o755)
                elif Path(binary).is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(binary, target)
                # else: leave it missing so that verify reports it.
    return root


def verify_problems(base: Path, units: dict[str, str]) -> list[str]:
    """Everything `systemd-analyze verify` has to say about UNITS; [] means clean."""
    analyze = tool("systemd-analyze")
    root = fake_root(base, units)
    status, lines = run([analyze, "verify", f"--root={root}", *units])
    if status != 0:
        lines.append(f"systemd-analyze verify exited with status {status}")
    return lines


def shipped_units() -> dict[str, str]:
    return {SERVICE.name: SERVICE.read_text(), SOCKET.name: SOCKET.read_text()}


# ---- systemd-analyze verify ---------------------------------------------------------------


def test_units_verify_without_any_output(tmp_path: Path) -> None:
    assert verify_problems(tmp_path, shipped_units()) == []


BROKEN_UNITS = [
    # (unit, text to replace, replacement, expected in verify's output)
    ("aiosd.service", "WatchdogSec=30", "WatchdogSecc=30", "Unknown key 'WatchdogSecc'"),
    ("aiosd.service", "ExecReload=/bin/kill ", "ExecReload=/bin/no-such-kill ", "not executable"),
    ("aiosd.service", "ExecStart=/usr/bin/aiosd", "ExecStart=/usr/bin/aiosdd", "not executable"),
    ("aiosd.socket", "SocketMode=0666", "SocketMode=0866", "Failed to parse mode value"),
    ("aiosd.service", "Type=notify\n", "Type=notify-reload\n", "Failed to parse service type"),
]


@pytest.mark.parametrize(("unit", "old", "new", "expected"), BROKEN_UNITS)
def test_verify_check_catches_broken_units(
    tmp_path: Path, unit: str, old: str, new: str, expected: str
) -> None:
    """The check above can fail: a broken copy of a unit produces output, even where
    systemd-analyze itself exits 0 (unknown keys and bad values are only warnings)."""
    if new.startswith("Type=notify-reload") and systemd_version() >= 253:
        pytest.skip("Type=notify-reload exists from systemd 253 on")
    units = shipped_units()
    assert units[unit].count(old) == 1, f"{old!r} not found exactly once in {unit}"
    units[unit] = units[unit].replace(old, new)
    problems = verify_problems(tmp_path, units)
    assert any(expected in line for line in problems), problems


# ---- what the units say ------------------------------------------------------------------


@pytest.fixture(scope="module")
def service() -> Unit:
    return parse_unit(SERVICE.read_text())


@pytest.fixture(scope="module")
def socket_unit() -> Unit:
    return parse_unit(SOCKET.read_text())


def test_service_and_socket_agree_on_the_socket_path(service: Unit, socket_unit: Unit) -> None:
    from aiosd.paths import DEFAULT_RUNTIME_DIRECTORY, SOCKET_NAME

    listen = values(socket_unit, "Socket", "ListenStream")
    assert listen == ["/run/aiosd/aiosd.sock"]
    # The daemon binds $RUNTIME_DIRECTORY/aiosd.sock itself when not socket-activated.
    runtime_dir = Path("/run") / value(service, "Service", "RuntimeDirectory")
    assert str(runtime_dir / SOCKET_NAME) == listen[0]
    assert str(DEFAULT_RUNTIME_DIRECTORY / SOCKET_NAME) == listen[0]
    # Both units may create /run/aiosd; they must not disagree on its mode.
    assert value(socket_unit, "Socket", "DirectoryMode") == value(
        service, "Service", "RuntimeDirectoryMode"
    )
    # Stopping the service must not delete the socket file that aiosd.socket listens on.
    assert value(service, "Service", "RuntimeDirectoryPreserve") == "yes"
    # Authorization is by SO_PEERCRED, so everyone may connect.
    assert value(socket_unit, "Socket", "SocketMode") == "0666"
    assert value(socket_unit, "Install", "WantedBy") == "sockets.target"


def test_service_is_notify_with_watchdog(service: Unit) -> None:
    assert value(service, "Service", "Type") == "notify"
    assert value(service, "Service", "NotifyAccess") == "main"
    watchdog = re.fullmatch(r"(\d+)s?", value(service, "Service", "WatchdogSec"))
    assert watchdog and int(watchdog.group(1)) > 0
    assert exec_binary(value(service, "Service", "ExecStart")) == DAEMON_BINARY
    assert value(service, "Service", "ExecReload").split()[1:] == ["-HUP", "$MAINPID"]


def test_service_restart_policy(service: Unit) -> None:
    assert value(service, "Service", "Restart") == "on-failure"
    # 78 = EX_CONFIG: an invalid configuration must not restart-loop.
    assert "78" in words(service, "Service", "RestartPreventExitStatus")
    assert value(service, "Service", "TimeoutStopSec") == "30"


def test_service_works_with_or_without_the_socket_unit(service: Unit) -> None:
    assert "aiosd.socket" in words(service, "Unit", "Wants")
    assert "aiosd.socket" in words(service, "Unit", "After")
    for hard in ("Requires", "Requisite", "BindsTo", "PartOf"):
        assert "aiosd.socket" not in words(service, "Unit", hard), hard
    assert value(service, "Install", "WantedBy") == "multi-user.target"
    assert value(service, "Install", "Also") == "aiosd.socket"


def test_service_capabilities_are_exactly_the_documented_ones(service: Unit) -> None:
    assert set(words(service, "Service", "CapabilityBoundingSet")) == {
        "CAP_SETUID",
        "CAP_SETGID",
        "CAP_KILL",
    }
    assert values(service, "Service", "AmbientCapabilities") == []
    assert value(service, "Service", "NoNewPrivileges") == "yes"


def test_service_exposure_score_within_budget() -> None:
    analyze = tool("systemd-analyze")
    if systemd_version() < 250:
        pytest.skip("systemd-analyze security --offline= needs systemd 250")
    status, lines = run([analyze, "security", "--offline=true", str(SERVICE)])
    assert status == 0, lines
    overall = [line for line in lines if "Overall exposure level" in line]
    assert len(overall) == 1, lines
    match = re.search(r": (\d+\.\d+) ", overall[0])
    assert match, overall[0]
    assert float(match.group(1)) <= EXPOSURE_BUDGET, overall[0]


# ---- sysusers.d and tmpfiles.d -----------------------------------------------------------


def test_sysusers_creates_the_access_groups(tmp_path: Path) -> None:
    from aiosd.config import AccessConfig

    sysusers = tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    status, lines = run([sysusers, f"--root={tmp_path}", str(SYSUSERS)])
    assert status == 0, lines
    # systemd-sysusers logs each group it creates; nothing else may be printed.
    created = [re.fullmatch(r"Creating group '([^']+)' with GID \d+\.", line) for line in lines]
    assert all(created), lines
    expected = {AccessConfig().user_group, AccessConfig().admin_group}
    assert {m.group(1) for m in created if m} == expected
    group_names = {line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert group_names == expected


def test_tmpfiles_creates_the_state_directory(tmp_path: Path, service: Unit) -> None:
    tmpfiles = tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("creating a root-owned directory needs root")
    status, lines = run([tmpfiles, f"--root={tmp_path}", "--create", str(TMPFILES)])
    assert (status, lines) == (0, [])
    state = tmp_path / "var/lib" / value(service, "Service", "StateDirectory")
    info = state.stat()
    assert (info.st_uid, info.st_gid) == (0, 0)
    # Same mode as StateDirectoryMode=, so systemd and systemd-tmpfiles never fight.
    expected_mode = int(value(service, "Service", "StateDirectoryMode"), 8)
    assert oct(info.st_mode & 0o7777) == oct(expected_mode)

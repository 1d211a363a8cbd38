"""Fixtures: a real daemon process, real Unix users and groups (the tests run as root)."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import Daemon, PrivateBus, write_config

# verify_cleanup (autouse, every test): no threads, tasks or timers left behind, no event
# loop blocked for more than 50 ms; see tests/fixtures_cleanup.py.
pytest_plugins = ("tests.fixtures_cleanup",)

USER_GROUP = "aios"
USER_IN = "aiosd-test-in"
USER_IN2 = "aiosd-test-in2"
USER_OUT = "aiosd-test-out"
SHARE_GROUP = "aiosd-test-share"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One real aiosd (embedded model, 2 slots) per test module."""
    directory = tmp_path_factory.mktemp("aiosd")
    d = Daemon(directory, write_config(directory))
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


@dataclass(frozen=True)
class UnixUser:
    """A real Unix account made by the test setup."""

    name: str
    uid: int
    gid: int
    groups: list[int]


def _ensure_user(name: str, groups: list[str]) -> UnixUser:
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                name,
            ],
            check=True,
        )
    if groups:
        subprocess.run(["usermod", "-a", "-G", ",".join(groups), name], check=True)
    pw = pwd.getpwnam(name)
    # A home of their own, as a login user has (an agent starts in it by default).
    home = Path(pw.pw_dir)
    if not home.is_dir():
        home.mkdir(mode=0o700, parents=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)
    return UnixUser(name, pw.pw_uid, pw.pw_gid, os.getgrouplist(name, pw.pw_gid))


@pytest.fixture(scope="session")
def unix_users() -> dict[str, UnixUser]:
    """``in``, ``in2``: members of ``aios`` and of a sharing group; ``out``: in neither."""
    if os.geteuid() != 0:
        pytest.fail("the test suite runs as root: it creates real users and groups")
    try:
        grp.getgrnam(USER_GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", USER_GROUP], check=True)
    try:
        grp.getgrnam(SHARE_GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", SHARE_GROUP], check=True)
    users = {
        "in": _ensure_user(USER_IN, [USER_GROUP, SHARE_GROUP]),
        "in2": _ensure_user(USER_IN2, [USER_GROUP, SHARE_GROUP]),
        "out": _ensure_user(USER_OUT, []),
    }
    assert grp.getgrnam(USER_GROUP).gr_gid in users["in"].groups
    assert grp.getgrnam(USER_GROUP).gr_gid not in users["out"].groups
    return users


def run_as(
    user: UnixUser, script: str, timeout: float = 60.0, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a Python script as ``user`` with an isolated interpreter (no access to the repo)."""
    return subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", script],
        user=user.uid,
        group=user.gid,
        extra_groups=user.groups,
        cwd="/",
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    """A temporary directory everyone can traverse (for sockets other users connect to)."""
    tmp_path.chmod(0o755)
    return tmp_path


@pytest.fixture(scope="session")
def private_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateBus]:
    """One real dbus-daemon for the session, reachable by the test users."""
    import tempfile

    bus = PrivateBus(Path(tempfile.mkdtemp(prefix="aiosd-bus-")))
    bus.start()
    yield bus
    bus.stop()

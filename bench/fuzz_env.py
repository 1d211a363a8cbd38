"""The setting of the hostile-user scenarios: real users, a private bus, a small daemon.

The scenarios ``fuzz``, ``rss`` and ``hostile`` act as unprivileged users, so they make (once,
as root, like the test suite does) a group ``aios-bench`` with two members and one user with
no role, start a private dbus-daemon (bench/bus.py), and run the daemon under test (the work
tree, or ``run.py --commit``'s snapshot) with the fuzzing config of bench/fuzz.py: members of
``aios-bench`` only, one slot, 4-token answers by default, small memory budgets.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.bus import PrivateBus
from bench.fuzz import daemon_config
from bench.peer import Identity, ensure_user
from bench.procs import NotifiedProcess

USER_GROUP = "aios-bench"
MEMBER, OTHER, NO_ROLE = "aiosd-bench-user", "aiosd-bench-user2", "aiosd-bench-norole"


@dataclass(frozen=True)
class Setting:
    """What a scenario works with."""

    daemon: NotifiedProcess
    socket_path: Path
    bus_address: str
    bus_socket: Path
    member: Identity
    other: Identity
    no_role: Identity
    log: Path


def _traversable(directory: Path) -> None:
    """Let the scenario's users reach sockets below ``directory`` (its parents are 0700)."""
    for d in (directory, *directory.parents):
        if d == Path("/tmp") or d == Path("/"):
            break
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)


@contextlib.contextmanager
def setting(
    workdir: Path, *, storage_quota: int = 128 * 1024 * 1024, extra: str = ""
) -> Iterator[Setting]:
    """Users, bus and daemon for one scenario; everything started is stopped at the end."""
    _traversable(workdir)
    member = ensure_user(MEMBER, (USER_GROUP,))
    other = ensure_user(OTHER, (USER_GROUP,))
    no_role = ensure_user(NO_ROLE)
    with PrivateBus(workdir / "bus") as bus:
        bus.socket.chmod(0o777)
        directory = workdir / "daemon"
        config = daemon_config(
            directory,
            user_group=USER_GROUP,
            dbus_address=bus.address,
            storage_quota=storage_quota,
            extra=extra,
        )
        argv = [sys.executable, "-m", "aiosd", "--config", str(config)]
        with NotifiedProcess(argv, directory, "aiosd") as daemon:
            yield Setting(
                daemon,
                directory / "run" / "aiosd.sock",
                bus.address,
                bus.socket,
                member,
                other,
                no_role,
                daemon.log_path,
            )

"""D-Bus under hostile calls: every method of every interface, from real unprivileged users.

The calls come from the live introspection of ``org.aiosd.Daemon1`` and the syscall table
(bench/fuzz_dbus.py): wrong signatures, extreme values, options of every type, and the
standard interfaces (Properties, Introspectable, Peer) on the manager, on the caller's own
request objects, on another user's and on paths where nothing is.  They are made on bus
connections that each user's own process authenticated (bench/peer.py), as a member of
``aios`` and as a user with no role.  Every call must get one reply and never an internal
error or a traceback; the daemon logs no error, keeps its bus connection (the same unique
name owns ``org.aiosd.Daemon1`` before and after), and its memory stops growing once warmed up.

The seed is fixed (``AIOSD_FUZZ_SEED`` overrides it) and printed, so a failure reproduces.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import fuzz, fuzz_dbus
from bench.peer import identity, log_problems, rss
from tests.conftest import USER_GROUP, UnixUser
from tests.support import Daemon, PrivateBus

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("AIOSD_FUZZ_SEED", "90210"))
WARM_UP, MEASURED = 1000, 2000
NO_ROLE = 800
RSS_BOUND = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def bus_fuzz_daemon(private_bus: PrivateBus, unix_users: dict[str, UnixUser]) -> Iterator[Daemon]:
    """A daemon of its own on the private bus (one slot, 4-token answers)."""
    directory = Path(tempfile.mkdtemp(prefix="aiosd-fuzz-dbus-"))
    directory.chmod(0o755)
    config = fuzz.daemon_config(directory, user_group=USER_GROUP, dbus_address=private_bus.address)
    d = Daemon(directory, config)
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def _report(seed: int, tally: fuzz.Tally, problems: list[str]) -> str:
    lines = [f"seed {seed}: {tally.summary()}"]
    lines += [f.render() for f in tally.failures[:40]]
    if len(tally.failures) > 40:
        lines.append(f"... and {len(tally.failures) - 40} more failures")
    lines += [f"daemon log: {p}" for p in sorted(set(problems))[:20]]
    return "\n".join(lines)


def _broken(tally: fuzz.Tally, problems: list[str]) -> list[str]:
    """Every promise the run broke, one line each."""
    out = []
    if tally.failures:
        out.append(f"{len(tally.failures)} failed calls")
    if tally.replies != tally.expected:
        out.append(f"{tally.replies} replies to {tally.expected} calls")
    if tally.outcomes[fuzz_dbus.INTERNAL]:
        out.append(f"{tally.outcomes[fuzz_dbus.INTERNAL]} internal errors")
    if problems:
        out.append(f"{len(problems)} errors or tracebacks in the daemon log")
    return out


def _fuzz(
    private_bus: PrivateBus,
    daemon: Daemon,
    user: UnixUser,
    other: UnixUser,
    seed: int,
    counts: tuple[int, int],
    no_role: bool,
) -> tuple[fuzz.Tally, str, str, int]:
    """Run ``counts`` (warm-up, measured) calls as ``user``, with request objects of
    ``other`` about; (tally, owner before, owner after, VmRSS growth over the measured)."""
    dial = fuzz_dbus.BusDialer(identity(user.name), private_bus.socket)
    other_dial = fuzz_dbus.BusDialer(identity(other.name), private_bus.socket)
    try:
        con = dial()
        owner_before = fuzz_dbus.name_owner(con)
        xml = fuzz_dbus.introspect(con)
        theirs = other_dial()
        targets = fuzz_dbus.Targets(others=[fuzz_dbus.start_chat(theirs) for _ in range(2)])
        fuzzer = fuzz_dbus.BusFuzzer(dial, targets)
        fuzzer.con = con
        calls = fuzz_dbus.bus_cases(seed, sum(counts), xml, targets, no_role=no_role)
        fuzzer.run(itertools.islice(calls, counts[0]))
        before = rss(daemon.proc.pid)["VmRSS"]
        targets.others.append(fuzz_dbus.start_chat(theirs))
        tally = fuzzer.run(calls)
        grown = rss(daemon.proc.pid)["VmRSS"] - before
        owner_after = fuzz_dbus.name_owner(theirs)
    finally:
        dial.close()
        other_dial.close()
    return tally, owner_before, owner_after, grown


def test_member_fuzzing_dbus_gets_one_clean_reply_per_call(
    private_bus: PrivateBus, bus_fuzz_daemon: Daemon, unix_users: dict[str, UnixUser]
) -> None:
    print(f"D-Bus fuzz seed {SEED} (AIOSD_FUZZ_SEED to change it)")
    tally, before, after, grown = _fuzz(
        private_bus,
        bus_fuzz_daemon,
        unix_users["in"],
        unix_users["in2"],
        SEED,
        (WARM_UP, MEASURED),
        no_role=False,
    )
    problems = log_problems(bus_fuzz_daemon.log())
    report = _report(SEED, tally, problems)
    print(report)
    assert tally.sent == WARM_UP + MEASURED, report
    broken = _broken(tally, problems)
    # The daemon never lost its bus connection: the same unique name still owns the name.
    if before != after or "lost the connection" in bus_fuzz_daemon.log():
        broken.append(f"the daemon's bus connection changed: {before} -> {after}")
    if grown >= RSS_BOUND:
        broken.append(f"VmRSS grew {grown / 2**20:.1f} MiB over {MEASURED} calls after warm-up")
    assert broken == [], "\n".join(broken) + "\n" + report


def test_user_without_a_role_learns_nothing_over_dbus(
    private_bus: PrivateBus, bus_fuzz_daemon: Daemon, unix_users: dict[str, UnixUser]
) -> None:
    seed = SEED + 1
    print(f"D-Bus fuzz seed {seed} (no role)")
    tally, before, after, _ = _fuzz(
        private_bus,
        bus_fuzz_daemon,
        unix_users["out"],
        unix_users["in"],
        seed,
        (0, NO_ROLE),
        no_role=True,
    )
    problems = log_problems(bus_fuzz_daemon.log())
    report = _report(seed, tally, problems)
    print(report)
    # Every syscall method and every manager property was refused with PermissionDenied
    # (checked per call), whatever the arguments were; nothing else went wrong.
    broken = _broken(tally, problems)
    if before != after:
        broken.append(f"the daemon's bus connection changed: {before} -> {after}")
    assert broken == [], "\n".join(broken) + "\n" + report
    assert tally.outcomes[fuzz_dbus.PERMISSION_DENIED] > 0, report

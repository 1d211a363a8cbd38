"""The socket under hostile input: generated frames from real unprivileged users.

The frames come from the syscall table (bench/fuzz.py): every parameter of every syscall with
wrong types and edge values, parameters missing or unknown, malformed frames of every kind.
They are sent by a real member of ``aios`` and by a user with no role, each on a connection
that user's own process opened (bench/peer.py).  What the protocol promises must hold for every
frame: one reply with the request's id (null where the frame has none to give), never an
internal error, never a traceback, no connection dropped but after a frame over the size limit;
the daemon logs no error, and its memory stops growing once warmed up.

The seed is fixed (``AIOSD_FUZZ_SEED`` overrides it) and printed, so a failure reproduces.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import fuzz
from bench.peer import Dialer, identity, log_problems, rss
from tests.conftest import USER_GROUP, UnixUser
from tests.support import Daemon

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("AIOSD_FUZZ_SEED", "90210"))
#: Frames sent before the daemon's RSS is first read (one full sweep of the table and more),
#: and after it, as the member user.
WARM_UP, MEASURED = 1000, 2000
#: Frames sent by the user with no role.
NO_ROLE = 800
#: Growth of VmRSS allowed over the measured frames (generous: allocator noise is ~2 MiB).
RSS_BOUND = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def fuzz_daemon(unix_users: dict[str, UnixUser]) -> Iterator[Daemon]:
    """A daemon of its own (one slot, 4-token answers), its socket reachable by the users."""
    directory = Path(tempfile.mkdtemp(prefix="aiosd-fuzz-socket-"))
    directory.chmod(0o755)
    d = Daemon(directory, fuzz.daemon_config(directory, user_group=USER_GROUP))
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def _report(tally: fuzz.Tally, problems: list[str]) -> str:
    lines = [f"seed {SEED}: {tally.summary()}"]
    lines += [f.render() for f in tally.failures[:40]]
    if len(tally.failures) > 40:
        lines.append(f"... and {len(tally.failures) - 40} more failures")
    lines += [f"daemon log: {p}" for p in sorted(set(problems))[:20]]
    return "\n".join(lines)


def _broken(tally: fuzz.Tally, problems: list[str]) -> list[str]:
    """Every promise the run broke, one line each."""
    out = []
    if tally.failures:
        out.append(f"{len(tally.failures)} failed frames")
    if tally.replies != tally.expected:
        out.append(f"{tally.replies} replies to {tally.expected} requests")
    if tally.internal_errors():
        out.append(f"{tally.internal_errors()} internal errors")
    if problems:
        out.append(f"{len(problems)} errors or tracebacks in the daemon log")
    return out


def test_member_fuzzing_the_socket_gets_one_clean_reply_per_frame(
    unix_users: dict[str, UnixUser], fuzz_daemon: Daemon
) -> None:
    print(f"socket fuzz seed {SEED} (AIOSD_FUZZ_SEED to change it)")
    member = identity(unix_users["in"].name)
    dial = Dialer(member, fuzz_daemon.socket_path)
    fuzzer = fuzz.SocketFuzzer(dial)
    frames = fuzz.cases(fuzz.Plan(seed=SEED, count=WARM_UP + MEASURED, share_group=USER_GROUP))
    try:
        fuzzer.run(itertools.islice(frames, WARM_UP))
        before = rss(fuzz_daemon.proc.pid)["VmRSS"]
        tally = fuzzer.run(frames)
        after = rss(fuzz_daemon.proc.pid)["VmRSS"]
    finally:
        fuzzer.close()
        dial.close()
    problems = log_problems(fuzz_daemon.log())
    grown = after - before
    broken = _broken(tally, problems)
    # Closes happened only after frames over the limit, each followed by one reconnect.
    if not tally.closes == tally.reconnects == tally.outcomes["-32007 FrameTooLarge"]:
        broken.append(f"{tally.closes} closes, {tally.reconnects} reconnects")
    if grown >= RSS_BOUND:
        broken.append(
            f"VmRSS grew {grown / 2**20:.1f} MiB over {MEASURED} frames after warm-up "
            f"({before / 2**20:.1f} -> {after / 2**20:.1f} MiB)"
        )
    report = _report(tally, problems)
    print(report)
    assert tally.sent >= WARM_UP + MEASURED, report
    assert broken == [], "\n".join(broken) + "\n" + report


def test_user_without_a_role_is_refused_everything_cleanly(
    unix_users: dict[str, UnixUser], fuzz_daemon: Daemon
) -> None:
    print(f"socket fuzz seed {SEED + 1} (no role)")
    outsider = identity(unix_users["out"].name)
    dial = Dialer(outsider, fuzz_daemon.socket_path)
    fuzzer = fuzz.SocketFuzzer(dial)
    plan = fuzz.Plan(seed=SEED + 1, count=NO_ROLE, share_group=USER_GROUP, no_role=True)
    try:
        tally = fuzzer.run(fuzz.cases(plan))
    finally:
        fuzzer.close()
        dial.close()
    problems = log_problems(fuzz_daemon.log())
    report = _report(tally, problems)
    print(report)
    assert tally.sent == NO_ROLE, report
    # Every request was refused (PermissionDenied is checked per frame); nothing was served.
    broken = _broken(tally, problems)
    if tally.outcomes["ok"]:
        broken.append(f"{tally.outcomes['ok']} requests served")
    assert broken == [], "\n".join(broken) + "\n" + report
    assert tally.outcomes["-32001 PermissionDenied"] > NO_ROLE // 2, report

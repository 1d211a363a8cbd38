"""``system.queue`` over a real socket: a user sees their own requests and counts of the rest."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import UnixUser, run_as
from tests.support import (
    Daemon,
    RawClient,
    queue_of,
    shared_daemon,
    story_request,
    wait_until,
)

pytestmark = pytest.mark.e2e

#: Holds the one slot and a place in the queue: two long generations, read until killed.
HOLDER = """
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect({path!r})
s.sendall(b"".join(json.dumps(f).encode() + b"\\n" for f in {frames!r}))
print(os.getpid(), flush=True)
for line in s.makefile("rb"):
    pass
"""

QUEUE = """
import json, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect({path!r})
s.sendall(b'{{"jsonrpc": "2.0", "id": 1, "method": "system.queue"}}\\n')
print(s.makefile("rb").readline().decode(), end="")
"""


@pytest.fixture(scope="module")
def open_daemon() -> Iterator[Daemon]:
    """A daemon with one slot whose socket other users can reach."""
    with shared_daemon("aiosd-queue-") as d:
        yield d


def _queue_as(user: UnixUser, daemon: Daemon) -> dict[str, Any]:
    out = run_as(user, QUEUE.format(path=str(daemon.socket_path)))
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)["result"]
    return result


def _sizes(queue: dict[str, Any]) -> tuple[int, int]:
    """How many requests a model's queue lists as running and as waiting."""
    return len(queue["running"]), len(queue["waiting"])


def _keys(value: object) -> set[str]:
    """Every key of every object inside ``value``."""
    if isinstance(value, dict):
        return set(value).union(*(_keys(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(_keys(v) for v in value))
    return set()


def test_a_users_requests_are_theirs_and_administrators_to_see(
    unix_users: dict[str, UnixUser], open_daemon: Daemon
) -> None:
    owner, other = unix_users["in"], unix_users["in2"]
    frames = [story_request(1, 1500), story_request(2, 1500)]
    holder = subprocess.Popen(
        [
            "/usr/bin/python3",
            "-I",
            "-S",
            "-c",
            HOLDER.format(path=str(open_daemon.socket_path), frames=frames),
        ],
        user=owner.uid,
        group=owner.gid,
        extra_groups=owner.groups,
        cwd="/",
        stdout=subprocess.PIPE,
        text=True,
    )
    admin = RawClient(open_daemon.socket_path)
    try:
        assert holder.stdout is not None
        holder_pid = int(holder.stdout.readline())
        # Root, an administrator, sees whose requests hold the slot and wait for it.
        wait_until(
            lambda: _sizes(queue_of(admin)) == (1, 1),
            30,
            "the owner's requests running and waiting",
            lambda: queue_of(admin),
        )
        seen_by_admin = admin.call("system.queue")["result"]
        seen_by_other = _queue_as(other, open_daemon)
        seen_by_owner = _queue_as(owner, open_daemon)
        still = queue_of(admin)  # the owner's requests were there all along
        assert _sizes(still) == (1, 1), still
    finally:
        admin.close()
        holder.kill()
        holder.wait()

    # Another user learns how busy the model is, and nothing of whom it is busy for.
    (q,) = seen_by_other["models"]
    assert q["running"] == [] and q["waiting"] == [], seen_by_other
    assert not _keys(seen_by_other) & {"uid", "pid", "request_id", "waited_ms", "running_ms"}
    assert (q["running_total"], q["waiting_total"]) == (1, 1), seen_by_other
    assert q["by_priority"] == [
        {"priority": "interactive", "running": 0, "waiting": 0},
        {"priority": "normal", "running": 1, "waiting": 1},
        {"priority": "batch", "running": 0, "waiting": 0},
    ], seen_by_other
    # The owner and an administrator see the requests in full.
    for view in (seen_by_admin, seen_by_owner):
        (mine,) = view["models"]
        assert [(r["uid"], r["pid"]) for r in mine["running"]] == [(owner.uid, holder_pid)], view
        assert [(w["uid"], w["pid"], w["position"]) for w in mine["waiting"]] == [
            (owner.uid, holder_pid, 1)
        ], view
        assert {"waited_ms", "running_ms"} <= set(mine["running"][0])

    # The same counts as everyone sees.
    for view in (seen_by_admin, seen_by_owner):
        (full,) = view["models"]
        assert (full["running_total"], full["waiting_total"]) == (1, 1)
        assert full["by_priority"] == q["by_priority"]

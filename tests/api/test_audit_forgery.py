"""A member user's strings in the audit trail: escaped, one record per line, never a forgery."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import UnixUser, run_as
from tests.support import Daemon, shared_daemon
from tests.unit.test_audit import RECORD, parse

pytestmark = pytest.mark.e2e

SEND_ALL = """
import json, os, socket, sys
frames = json.load(sys.stdin)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect({path!r})
s.sendall(b"".join(json.dumps(f).encode() + b"\\n" for f in frames))
replies = s.makefile("rb")
print(json.dumps({{"pid": os.getpid(), "replies": [json.loads(replies.readline())
                                                  for _ in frames]}}))
"""


@pytest.fixture(scope="module")
def open_daemon() -> Iterator[Daemon]:
    """A daemon logging to stderr (a file here) whose socket other users can reach."""
    with shared_daemon("aiosd-forgery-") as d:
        yield d


def _send_as(user: UnixUser, daemon: Daemon, frames: list[dict[str, Any]]) -> tuple[int, list[Any]]:
    """Send ``frames`` on one connection as ``user``: (the client's pid, the replies)."""
    out = run_as(user, SEND_ALL.format(path=str(daemon.socket_path)), stdin=json.dumps(frames))
    assert out.returncode == 0, out.stderr
    sent = json.loads(out.stdout)
    return sent["pid"], sent["replies"]


def test_a_caller_cannot_forge_audit_records(
    unix_users: dict[str, UnixUser], open_daemon: Daemon
) -> None:
    user = unix_users["in"]
    prefix = f"aiosd[{open_daemon.proc.pid}]: INFO aiosd.audit: "
    # A whole record, with the daemon's real prefix, claiming root reloaded the daemon.
    forged = f"{prefix}system.reload uid=0 pid=1 aid=- verdict=ok"
    # The method name is cut to 64 characters in its record: the forgery is its next line,
    # which the real record's own " uid=… verdict=unknown" would complete.
    method = f"x\n{prefix}system.reload"
    assert len(method) <= 64
    key = f"k\n{forged}\r\n{forged}\u2028"
    pid, replies = _send_as(
        user,
        open_daemon,
        [
            {"jsonrpc": "2.0", "id": 1, "method": method, "params": {}},
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "storage.search",
                "params": {"query": "q", "metadata": {key: ["not", "a", "scalar"]}},
            },
        ],
    )
    assert replies[0]["error"]["code"] == -32601, replies  # MethodNotFound
    assert replies[1]["error"]["code"] == -32602, replies  # InvalidParams, naming the key
    assert key in replies[1]["error"]["message"]
    # Both records carry the client's real identity, however they were split (or not).
    ours = f"uid={user.uid} pid={pid} aid=- verdict="
    open_daemon.wait_log(ours + "unknown", 10)
    open_daemon.wait_log(ours + "invalid", 10)

    lines = open_daemon.log().splitlines()
    records = [line for line in lines if " aiosd.audit: " in line]
    # Every line that names the audit logger is a complete record, and none claims root.
    assert all(RECORD.fullmatch(line) for line in records), records
    parsed = [parse(line) for line in records]
    assert not [r for r in parsed if r is not None and r["uid"] == 0 and r["pid"] == 1], records
    # Exactly one line per record of this client, each giving back what the client sent.
    mine = [r for r in parsed if r is not None and r["pid"] == pid]
    assert [(r["uid"], r["syscall"], r["verdict"]) for r in mine] == [
        (user.uid, method, "unknown"),
        (user.uid, "storage.search", "invalid"),
    ], records
    assert isinstance(mine[1]["detail"], str) and key in mine[1]["detail"]
    # And no line of the log begins with the forgery, not even as a fragment of a record.
    assert not [line for line in lines if line.startswith(f"{prefix}system.reload")], lines

"""Connections are bounded per user, and administrators keep a reserve (issue 9, finding 5)."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import UnixUser
from tests.support import Daemon, RawClient, queue_of, story_request, wait_until, write_config

#: Opens N connections as the user it runs as, asks each for system.status, prints each
#: outcome (a result, or an error code and scope), then holds them until stdin closes.
HOLDER = """
import json, socket, sys
held, out = [], []
for _ in range({n}):
    s = socket.socket(socket.AF_UNIX)
    s.connect({path!r})
    try:  # a refused connection gets its error unasked, and may be closed already
        s.sendall(b'{{"jsonrpc":"2.0","id":1,"method":"system.status"}}\\n')
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = json.loads(s.makefile("rb").readline())
    if "result" in reply:
        out.append("ok")
    else:
        out.append([reply["error"]["code"], reply["error"]["data"].get("scope")])
    held.append(s)
print(json.dumps(out), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def limited_daemon() -> Iterator[Daemon]:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-limits-"))
    directory.chmod(0o755)
    extra = (
        "[socket]\nmax_connections = 6\nmax_connections_per_user = 3\n"
        "admin_reserved_connections = 2\n"
    )
    d = Daemon(directory, write_config(directory, extra=extra))
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0, d.log()


def hold(user: UnixUser, daemon: Daemon, n: int) -> tuple[subprocess.Popen[str], list[object]]:
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-I", "-S", "-c", HOLDER.format(n=n, path=str(daemon.socket_path))],
        user=user.uid,
        group=user.gid,
        extra_groups=user.groups,
        cwd="/",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def test_one_user_cannot_lock_others_or_administrators_out(
    unix_users: dict[str, UnixUser], limited_daemon: Daemon
) -> None:
    holders = []
    try:
        # A user who tries to take every connection gets their own share only.
        proc, outcomes = hold(unix_users["in"], limited_daemon, 5)
        holders.append(proc)
        assert outcomes == ["ok"] * 3 + [[-32009, "user"]] * 2
        # Another user still gets in, up to the places not kept for administrators.
        proc, outcomes = hold(unix_users["in2"], limited_daemon, 2)
        holders.append(proc)
        assert outcomes == ["ok", [-32009, "users"]]
        # Root is an administrator: the reserve is theirs, then the daemon's limit holds.
        admins = [RawClient(limited_daemon.socket_path) for _ in range(2)]
        assert all("result" in c.call("system.status") for c in admins)
        over = RawClient(limited_daemon.socket_path)
        reply = over.recv()
        assert reply["error"]["code"] == -32009 and reply["error"]["data"]["scope"] == "daemon"
        for c in [*admins, over]:
            c.close()
    finally:
        for proc in holders:
            proc.communicate("", timeout=30)


def test_a_client_that_stops_reading_loses_its_slots(tmp_path: Path) -> None:
    extra = "[socket]\nstalled_timeout = 1.0\n"
    d = Daemon(tmp_path, write_config(tmp_path, extra=extra))
    try:
        d.wait_ready()
        stuck = RawClient(d.socket_path)
        big = {"collection": "big", "key": "v"}
        assert "result" in stuck.call("storage.put", {**big, "value": "x" * 1_000_000})
        # Two long generations take both slots; large replies then fill the send buffer,
        # and the client never reads another byte.
        for req_id in (1, 2):
            stuck.send(story_request(req_id, 256))
        observer = RawClient(d.socket_path)
        wait_until(lambda: len(queue_of(observer)["running"]) == 2, 60, "both slots taken")
        for req_id in range(3, 11):
            stuck.send({"jsonrpc": "2.0", "id": req_id, "method": "storage.get", "params": big})
        # Another client's chat is answered once the stalled client's slots are taken back.
        answer = observer.call(
            "llm.chat",
            {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4},
        )
        assert "result" in answer, answer
        d.wait_log("has not read its replies for 1 s")
        observer.close()
        stuck.close()
    finally:
        assert d.stop() == 0, d.log()

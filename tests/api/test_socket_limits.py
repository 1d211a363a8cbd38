"""Socket bounds per user: connections with a reserve for administrators, requests in flight,
replies left unread, and clients that stop reading (issue 9, findings 4 and 5)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.peer import Peer, identity
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
        who = unix_users["in"]
        limited_daemon.wait_log(
            f"aiosd.audit: connection uid={who.uid} pid={proc.pid} aid=- verdict=denied", count=2
        )
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


def test_a_client_that_stops_reading_loses_its_slots(unix_users: dict[str, UnixUser]) -> None:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-stall-"))
    directory.chmod(0o755)
    d = Daemon(directory, write_config(directory, extra="[socket]\nstalled_timeout = 1.0\n"))
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
        # Another user's chat is answered once the stalled client's slots are taken back.
        chat = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "llm.chat",
            "params": {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4},
        }
        with Peer(identity(unix_users["in2"].name), d.socket_path) as peer, peer.socket() as other:
            other.sendall(json.dumps(chat).encode() + b"\n")
            with other.makefile("rb") as lines:
                answer = json.loads(lines.readline())
        assert "result" in answer, answer
        d.wait_log("has not read its replies for 1 s")
        d.wait_log(f"aiosd.audit: connection uid=0 pid={os.getpid()} aid=- verdict=closed")
        # And the stalled connection is gone: what the kernel still held, then its end.
        with contextlib.suppress(ConnectionResetError):
            while stuck.sock.recv(1024 * 1024):
                pass
        observer.close()
        stuck.close()
    finally:
        assert d.stop() == 0, d.log()


def test_requests_in_flight_are_bounded_per_user_across_connections(tmp_path: Path) -> None:
    extra = "[socket]\nmax_inflight_per_connection = 2\nmax_inflight_per_user = 3\n"
    d = Daemon(tmp_path, write_config(tmp_path, extra=extra))
    try:
        d.wait_ready()
        first, second, observer = (RawClient(d.socket_path) for _ in range(3))
        # Two long generations take both slots; a third waits in the queue: three in flight,
        # on two connections, each under its own limit of two.
        for req_id in (1, 2):
            first.send(story_request(req_id, 256))
        second.send(story_request(3, 256))

        def held() -> bool:
            entry = queue_of(observer)
            return len(entry["running"]) == 2 and len(entry["waiting"]) == 1

        wait_until(held, 60, "two generations running and one waiting")
        get = {"collection": "c", "key": "k"}
        for client in (second, observer):  # any connection of that user
            reply = client.call("storage.get", get, req_id="over")
            err = reply["error"]
            assert err["code"] == -32008, reply
            assert err["data"] == {"limit": 3, "scope": "user"}
            assert "socket.max_inflight_per_user" in err["message"]
            # A request that answers at once holds nothing: it is never refused for this.
            assert "result" in client.call("system.status", req_id="status")
        first.close()  # its two requests are cancelled: the user has room again
        deadline = time.monotonic() + 30
        while (reply := observer.call("storage.get", get, req_id="again"))["error"][
            "code"
        ] == -32008 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reply["error"]["code"] == -32012, reply  # NotFound: it ran
        while (frame := second.recv()).get("id") != 3:
            assert frame.get("method") == "stream", frame
        assert "result" in frame, frame
        second.close()
        observer.close()
    finally:
        assert d.stop() == 0, d.log()


#: One system.status request: a ~50-byte frame whose reply is ~6 times longer.
STATUS = b'{"jsonrpc":"2.0","id":1,"method":"system.status"}\n'


def test_replies_left_unread_stay_bounded(tmp_path: Path) -> None:
    # 5 MB of requests in as few writes as the kernel takes: each read of the daemon brings
    # up to 256 KiB of frames, ~1.5 MB of replies if it answered them all.
    extra = "[socket]\nstalled_timeout = 2.0\n"
    d = Daemon(tmp_path, write_config(tmp_path, extra=extra))
    try:
        d.wait_ready()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.socket_path))
        s.setblocking(False)
        data = memoryview(STATUS * 100_000)
        sent = blocked = 0
        while sent < len(data) and blocked < 50:
            try:
                sent += s.send(data[sent : sent + 1024 * 1024])
                blocked = 0
            except BlockingIOError:
                blocked += 1
                time.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                break
        d.wait_log("has not read its replies for 2 s")
        found = re.search(r"(\d+) bytes of replies unread", d.log())
        assert found, d.log()
        # The daemon stops handling frames once its send buffer is over the high-water
        # mark (64 KiB): what waits in it is that, and at most one reply more.
        assert int(found.group(1)) <= 64 * 1024 + 1024, found.group(0)
        s.close()
    finally:
        assert d.stop() == 0, d.log()


def test_frames_held_back_are_answered_once_the_client_reads(daemon: Daemon) -> None:
    # ~1 MB of replies, far over what the daemon writes before it stops handling frames: the
    # rest wait, already read, until the client reads; then every frame has its answer, the
    # last one without its newline too, and the half-closed connection ends.
    total = 3000
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(daemon.socket_path))
    s.sendall(STATUS * (total - 1) + STATUS.rstrip(b"\n"))
    s.shutdown(socket.SHUT_WR)
    with s.makefile("rb") as reader:
        replies = [json.loads(line) for line in reader]  # until the daemon closes
    s.close()
    assert len(replies) == total
    assert all(r["result"]["state"] == "running" for r in replies)

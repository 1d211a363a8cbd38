"""Access, first cut: real Unix users; roles come from the peer's credentials only."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from tests.conftest import UnixUser, run_as
from tests.support import Daemon, shared_daemon

pytestmark = pytest.mark.e2e

CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1] if len(sys.argv) > 1 else {path!r})
s.sendall(json.dumps({{"jsonrpc": "2.0", "id": 1, "method": {method!r},
                      "params": {params!r}}}).encode() + b"\\n")
print(s.makefile("rb").readline().decode(), end="")
"""


@pytest.fixture(scope="module")
def open_daemon() -> Iterator[Daemon]:
    """A daemon whose socket other users can reach (a 0755 directory under /tmp)."""
    with shared_daemon("aiosd-access-") as d:
        yield d


def _call(
    user: UnixUser, daemon: Daemon, method: str, params: Mapping[str, object]
) -> dict[str, Any]:
    script = CLIENT.format(path=str(daemon.socket_path), method=method, params=params)
    out = run_as(user, script)
    assert out.returncode == 0, out.stderr
    reply: dict[str, Any] = json.loads(out.stdout)
    return reply


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


def _frame(req_id: int, method: str, params: object, **envelope: object) -> dict[str, object]:
    """A JSON-RPC request; ``envelope`` adds members beside ``jsonrpc``, ``id``, ``method``."""
    frame: dict[str, object] = {**envelope, "jsonrpc": "2.0", "id": req_id, "method": method}
    if params is not None:
        frame["params"] = params
    return frame


def _send_as(
    user: UnixUser, daemon: Daemon, frames: list[dict[str, object]]
) -> tuple[int, dict[int, dict[str, Any]]]:
    """Send ``frames`` on one connection as ``user``: (the client's pid, replies by id)."""
    out = run_as(user, SEND_ALL.format(path=str(daemon.socket_path)), stdin=json.dumps(frames))
    assert out.returncode == 0, out.stderr
    sent = json.loads(out.stdout)
    replies = {r["id"]: r for r in sent["replies"]}
    assert len(replies) == len(frames), sent
    return sent["pid"], replies


def test_user_outside_the_groups_is_refused(
    unix_users: dict[str, UnixUser], open_daemon: Daemon
) -> None:
    out = unix_users["out"]
    for method, params in (
        ("system.status", {}),
        ("llm.chat", {"messages": [{"role": "user", "content": "hi"}]}),
    ):
        reply = _call(out, open_daemon, method, params)
        err = reply["error"]
        assert err["code"] == -32001
        assert f"uid {out.uid}" in err["message"] and "'aios'" in err["message"]
    # Audit records are written by the daemon's writer thread a moment after the reply.
    open_daemon.wait_log(f"system.status uid={out.uid}", 10)
    assert "verdict=denied" in open_daemon.log()


def test_member_of_aios_is_served_as_itself(
    unix_users: dict[str, UnixUser], open_daemon: Daemon
) -> None:
    user = unix_users["in"]
    status = _call(user, open_daemon, "system.status", {})["result"]
    assert status["caller_uid"] == user.uid
    assert status["caller_role"] == "user"
    chat = _call(
        user,
        open_daemon,
        "llm.chat",
        {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 4},
    )
    assert chat["result"]["usage"]["completion_tokens"] == 4
    assert chat["result"]["message"]["content"]
    open_daemon.wait_log(f"llm.chat uid={user.uid}", 10)


def test_identity_cannot_be_claimed_in_the_payload(
    unix_users: dict[str, UnixUser], open_daemon: Daemon
) -> None:
    user, other, outsider = unix_users["in"], unix_users["in2"], unix_users["out"]
    store = open_daemon.directory / "state" / "storage"
    root_claim = {"uid": 0, "gid": 0, "pid": 1, "groups": [0], "aid": "claimed-agent"}
    # Another member of the same groups: believing the claim would not even need root.
    other_claim = {"uid": other.uid, "gid": other.gid, "user": other.name}
    note = {"collection": "claims", "key": "k"}
    pid, replies = _send_as(
        user,
        open_daemon,
        [
            # In the envelope, beside the JSON-RPC members (the server ignores unknown ones).
            _frame(1, "system.status", None, **root_claim, caller=root_claim),
            # In the params, which are validated.
            _frame(2, "system.status", root_claim),
            _frame(3, "system.status", {"caller": root_claim}),
            _frame(4, "storage.put", {**note, "value": "mine", **other_claim}),
            # A write carrying the other user's identity everywhere it can be carried.
            _frame(
                5,
                "storage.put",
                {**note, "value": "written by in", "metadata": other_claim},
                **other_claim,
                caller=other_claim,
            ),
            _frame(6, "storage.usage", None, **other_claim),
        ],
    )
    status = replies[1]["result"]
    assert status["caller_uid"] == user.uid and status["caller_role"] == "user"
    for req_id, fields in ((2, {"uid", "gid", "pid", "groups", "aid"}), (3, {"caller"})):
        err = replies[req_id]["error"]
        assert err["code"] == -32602, err
        assert {e["field"] for e in err["data"]["errors"]} == fields
    assert replies[4]["error"]["code"] == -32602
    assert {e["field"] for e in replies[4]["error"]["data"]["errors"]} == {"uid", "gid", "user"}
    assert replies[5]["result"]["version"] == 1, replies[5]
    assert replies[6]["result"]["uid"] == user.uid
    # The audit trail has the socket peer's pid and no agent id, not the claimed ones.
    open_daemon.wait_log(f"system.status uid={user.uid} pid={pid} aid=- verdict=ok", 10)
    open_daemon.wait_log(f"storage.put uid={user.uid} pid={pid} aid=- verdict=ok", 10)
    log = open_daemon.log()
    assert "uid=0 pid=1 " not in log and "claimed-agent" not in log
    # The write landed in the real user's store, and the other user has none.
    assert (store / f"{user.uid}.sqlite").exists()
    assert not (store / f"{other.uid}.sqlite").exists()
    mine = _send_as(user, open_daemon, [_frame(1, "storage.get", note)])[1][1]
    assert mine["result"]["value"] == "written by in"
    theirs = _send_as(other, open_daemon, [_frame(1, "storage.get", note)])[1][1]
    assert theirs["error"]["code"] == -32012, theirs  # NotFound: nothing was written as them

    # A caller with no role claiming root anywhere is still refused, as itself.
    _, refused = _send_as(
        outsider,
        open_daemon,
        [
            _frame(1, "system.status", None, **root_claim, caller=root_claim),
            _frame(2, "system.status", root_claim),
        ],
    )
    for reply in refused.values():
        assert reply["error"]["code"] == -32001, reply
        assert f"uid {outsider.uid} " in reply["error"]["message"]


def test_root_is_admin(open_daemon: Daemon) -> None:
    from aiosd.sdk import Client

    with Client(open_daemon.socket_path) as c:
        assert c.call("system.status")["caller_role"] == "admin"

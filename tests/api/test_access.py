"""Access, first cut: real Unix users; roles come from the peer's credentials only."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import UnixUser, run_as
from tests.support import Daemon, write_config

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
    directory = Path(tempfile.mkdtemp(prefix="aiosd-access-"))
    directory.chmod(0o755)
    d = Daemon(directory, write_config(directory, slots=1))
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


def _call(user: UnixUser, daemon: Daemon, method: str, params: dict[str, object]) -> dict:
    script = CLIENT.format(path=str(daemon.socket_path), method=method, params=params)
    out = run_as(user, script)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


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
    log = open_daemon.log()
    assert f"system.status uid={out.uid}" in log and "verdict=denied" in log


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
    assert f"llm.chat uid={user.uid}" in open_daemon.log()


def test_identity_cannot_be_claimed_in_the_payload(
    unix_users: dict[str, UnixUser], open_daemon: Daemon
) -> None:
    reply = _call(unix_users["out"], open_daemon, "system.status", {"uid": 0})
    # Unknown fields are rejected, and nothing in params can change who the caller is.
    assert reply["error"]["code"] in (-32602, -32001)
    status = _call(unix_users["in"], open_daemon, "system.status", {})["result"]
    assert status["caller_uid"] == unix_users["in"].uid


def test_root_is_admin(open_daemon: Daemon) -> None:
    from aiosd.sdk import Client

    with Client(open_daemon.socket_path) as c:
        assert c.call("system.status")["caller_role"] == "admin"

"""JSON-RPC protocol over the Unix socket: every error case, and the daemon keeps serving."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Daemon, RawClient, call_every_syscall, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture
def client(daemon: Daemon) -> Iterator[RawClient]:
    """A raw connection to the module's daemon."""
    c = RawClient(daemon.socket_path, timeout=30)
    yield c
    c.close()


def _still_serving(path: Path) -> None:
    other = RawClient(path, timeout=30)
    assert other.call("system.status", req_id="other")["result"]["state"] == "running"
    other.close()


def _no_traceback(reply: dict[str, object]) -> None:
    text = json.dumps(reply)
    assert "Traceback" not in text and "/aiosd/" not in text and ".py" not in text


def test_malformed_json_gets_parse_error_and_connection_stays_usable(
    daemon: Daemon, client: RawClient
) -> None:
    client.send_raw(b'{"jsonrpc": "2.0", "id": 1, "method": \n')
    reply = client.recv()
    assert reply["error"]["code"] == -32700 and reply["id"] is None
    _no_traceback(reply)
    assert client.call("system.status", req_id=2)["result"]["version"]
    _still_serving(daemon.socket_path)


def test_not_a_request_gets_invalid_request(client: RawClient) -> None:
    for frame in (
        b"[]\n",
        b'"hello"\n',
        b'{"id": 3, "method": "system.status"}\n',
        b'{"jsonrpc": "2.0", "id": 3, "method": 42}\n',
    ):
        client.send_raw(frame)
        reply = client.recv()
        assert reply["error"]["code"] == -32600, frame
    assert client.call("system.status", req_id=4)["result"]


def test_unknown_method(client: RawClient) -> None:
    reply = client.call("llm.teleport", {}, req_id="x")
    assert reply["id"] == "x"
    assert reply["error"]["code"] == -32601
    assert "llm.teleport" in reply["error"]["message"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "priority": "urgent"}, "priority"),
        ({"messages": [{"role": "user", "content": "hi"}], "colour": "red"}, "colour"),
        ({}, "messages"),
    ],
)
def test_bad_params_name_the_field_path(
    client: RawClient, params: dict[str, object], field: str
) -> None:
    reply = client.call("llm.chat", params, req_id=5)
    err = reply["error"]
    assert err["code"] == -32602
    assert err["data"]["errors"][0]["field"] == field
    assert field in err["message"]
    _no_traceback(reply)


def test_params_must_be_an_object(client: RawClient) -> None:
    reply = client.call("system.status", [1, 2], req_id=6)
    assert reply["error"]["code"] == -32602


def test_unknown_model_is_named(client: RawClient) -> None:
    reply = client.call(
        "llm.chat", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-9"}, req_id=7
    )
    assert reply["error"]["code"] == -32004
    assert "gpt-9" in reply["error"]["message"] and "smollm2" in reply["error"]["message"]


def test_oversize_frame_gets_error_then_close(daemon: Daemon) -> None:
    c = RawClient(daemon.socket_path, timeout=30)
    payload = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "llm.chat",
        "params": {"messages": [{"role": "user", "content": "x" * (1024 * 1024 + 10)}]},
    }
    try:
        c.send(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon may close before it has read everything; the reply is still there
    reply = c.recv()
    assert reply["error"]["code"] == -32007
    assert reply["error"]["data"]["limit"] == 1024 * 1024
    with pytest.raises((EOFError, ConnectionResetError)):
        c.recv()
    c.close()
    _still_serving(daemon.socket_path)


def test_too_many_requests_in_flight(daemon: Daemon, client: RawClient) -> None:
    frames = b"".join(
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": i,
                "method": "llm.chat",
                "params": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            }
        ).encode()
        + b"\n"
        for i in range(20)
    )
    client.send_raw(frames)
    replies = [client.recv() for _ in range(20)]
    refused = [r for r in replies if "error" in r]
    served = [r for r in replies if "result" in r]
    assert len(served) == 16 and len(refused) == 4
    for r in refused:
        assert r["error"]["code"] == -32008 and r["error"]["data"]["limit"] == 16
    assert sorted(r["id"] for r in refused) == [16, 17, 18, 19]
    assert client.call("system.status", req_id="after")["result"]
    _still_serving(daemon.socket_path)


def test_notification_without_id_gets_no_reply(client: RawClient) -> None:
    client.send({"jsonrpc": "2.0", "method": "system.status"})
    reply = client.call("system.status", req_id="next")
    assert reply["id"] == "next"  # nothing arrived for the notification before this


def test_half_line_then_disconnect_does_not_hurt(daemon: Daemon) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(daemon.socket_path))
    s.sendall(b'{"jsonrpc": "2.0", "id": 1, "meth')
    s.close()
    _still_serving(daemon.socket_path)


def test_every_syscall_is_reachable_over_the_socket(client: RawClient) -> None:
    from aiosd.errors import error_for_code
    from aiosd.kernel.syscalls import SYSCALLS

    def call(name: str, params: dict[str, Any]) -> Any:
        reply = client.call(name, params, req_id=name)
        if "error" in reply:  # raised as the SDK would: call_every_syscall expects one
            e = reply["error"]
            raise error_for_code(e["code"], e["message"], e.get("data"))
        assert "result" in reply, (name, reply)
        SYSCALLS[name].result.model_validate(reply["result"])
        return reply["result"]

    assert call_every_syscall(call) == set(SYSCALLS)


def test_half_closed_client_still_gets_its_answers(daemon: Daemon) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(daemon.socket_path))
    s.sendall(
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "llm.chat",
                "params": {
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 6,
                    "stream": True,
                },
            }
        ).encode()
        + b"\n"
    )
    s.shutdown(socket.SHUT_WR)  # like `socat` at the end of its input
    lines = s.makefile("rb").read().splitlines()  # until the daemon closes
    s.close()
    final = json.loads(lines[-1])
    assert final["id"] == 1 and final["result"]["usage"]["completion_tokens"] == 6
    assert all(json.loads(x)["method"] == "stream" for x in lines[:-1])


def test_frame_limit_counts_the_newline(daemon: Daemon) -> None:
    limit = 1024 * 1024
    base = {"jsonrpc": "2.0", "id": 1, "method": "system.status", "params": {}}
    pad = limit - len(json.dumps(base).encode()) - 1  # exactly `limit` bytes with the newline
    exact = json.dumps(base).encode()[:-1] + b" " * pad + b"}\n"
    assert len(exact) == limit
    c = RawClient(daemon.socket_path)
    c.send_raw(exact)
    assert "result" in c.recv()
    c.send_raw(exact[:-2] + b" }\n")  # one byte more
    assert c.recv()["error"]["code"] == -32007
    c.close()


def test_connections_over_the_limit_are_refused_then_admitted_again(tmp_path: Path) -> None:
    extra = "[socket]\nmax_connections = 2\nadmin_reserved_connections = 0\n"
    d = Daemon(tmp_path, write_config(tmp_path, extra=extra))
    try:
        d.wait_ready()
        first, second = RawClient(d.socket_path), RawClient(d.socket_path)
        assert "result" in first.call("system.status") and "result" in second.call("system.status")
        third = RawClient(d.socket_path)
        reply = third.recv()  # sent unasked, then the daemon closes
        assert reply["error"]["code"] == -32009 and reply["error"]["data"]["limit"] == 2
        assert "socket.max_connections" in reply["error"]["message"]
        with pytest.raises((EOFError, ConnectionResetError)):
            third.recv()
        third.close()
        assert "result" in first.call("system.status", req_id="still")  # the others go on
        second.close()
        deadline = time.monotonic() + 10
        while True:  # the freed place is released once the daemon has seen the close
            fourth = RawClient(d.socket_path)
            reply = fourth.call("system.status")
            fourth.close()
            if "result" in reply or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert "result" in reply, reply
        first.close()
    finally:
        d.stop()


def test_a_client_that_does_not_read_stalls_only_itself(daemon: Daemon) -> None:
    frame = b'{"jsonrpc":"2.0","id":1,"method":"system.status"}\n'
    total = 100_000  # ~5 MB of requests, ~30 MB of replies if all were answered at once
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(daemon.socket_path))
    s.setblocking(False)
    data = memoryview(frame * total)
    sent = 0
    deadline = time.monotonic() + 3
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += s.send(data[sent : sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    # The daemon stopped reading this client once its replies went unread: the kernel's
    # buffers filled and the client could not send everything.
    assert sent < len(data) // 4, f"the daemon read {sent} bytes from a client that never read"
    _still_serving(daemon.socket_path)
    # Reading now lets everything through, every request answered once.
    s.settimeout(60)
    answered: list[int] = []

    def read_all() -> None:
        with s.makefile("rb") as reader:
            for _ in range(total):
                assert json.loads(reader.readline())["result"]["state"] == "running"
                answered.append(1)

    reader = threading.Thread(target=read_all)
    reader.start()
    s.sendall(data[sent:])
    reader.join(60)
    assert len(answered) == total
    s.close()


def test_names_no_utf8_can_carry_and_deep_nesting_get_errors_not_a_dropped_line(
    client: RawClient,
) -> None:
    # "\udc80" is valid JSON but a lone surrogate: not encodable as UTF-8.
    client.send_raw(b'{"jsonrpc":"2.0","id":"\\udc80","method":"\\udc80"}\n')
    reply = client.recv()
    assert reply["error"]["code"] == -32601 and reply["id"] == "\udc80"
    client.send_raw(b"[" * 100_000 + b"\n")
    assert client.recv()["error"]["code"] == -32700
    assert client.call("system.status", req_id="after")["result"]["state"] == "running"


@pytest.mark.parametrize(
    ("frame", "req_id", "says"),
    [
        (b'[{"jsonrpc":"2.0","id":1,"method":"system.status"}]', None, "batches"),
        (b'"hello"', None, "a JSON object, not a string"),
        (b'{"id":3,"method":"system.status"}', 3, "'jsonrpc' must be \"2.0\""),
        (b'{"jsonrpc":2.0,"id":3,"method":"system.status"}', 3, "'jsonrpc' must be \"2.0\""),
        (b'{"jsonrpc":"2.0","id":3}', 3, "'method' is missing"),
        (b'{"jsonrpc":"2.0","id":3,"method":42}', 3, "'method' must be a string, not a number"),
        (b'{"jsonrpc":"2.0","id":true,"method":"system.status"}', None, "not a boolean"),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"system.status"}', None, "with a fraction"),
        (b'{"jsonrpc":"2.0","id":[1],"method":"system.status"}', None, "not an array"),
    ],
)
def test_invalid_requests_say_what_is_wrong(
    daemon: Daemon, client: RawClient, frame: bytes, req_id: object, says: str
) -> None:
    client.send_raw(frame + b"\n")
    reply = client.recv()
    assert reply["id"] == req_id, reply
    assert reply["error"]["code"] == -32600, reply
    assert says in reply["error"]["message"], reply
    _no_traceback(reply)
    assert client.call("system.status", req_id="after")["result"]


def test_a_number_too_long_to_read_is_a_parse_error(daemon: Daemon, client: RawClient) -> None:
    client.send_raw(b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"system.status"}\n')
    reply = client.recv()
    assert reply["id"] is None and reply["error"]["code"] == -32700, reply
    message = reply["error"]["message"]
    assert "4300 digits" in message and "sys." not in message, message
    assert client.call("system.status", req_id="after")["result"]


def test_deep_nesting_anywhere_in_a_frame_is_a_parse_error_not_a_crash(
    daemon: Daemon, client: RawClient
) -> None:
    before = daemon.log()
    prefix = b'{"jsonrpc":"2.0","id":7,"method":"system.status","params":'
    for frame in (b"[" * 500_000, b'{"a":' * 200_000, prefix + b"[" * 500_000):
        client.send_raw(frame + b"\n")
        reply = client.recv()
        assert reply["id"] is None and reply["error"]["code"] == -32700, reply
        assert "nested too deeply" in reply["error"]["message"]
    assert client.call("system.status", req_id="after")["result"]
    added = daemon.log()[len(before) :]
    assert "Traceback" not in added and " ERROR " not in added, added

"""MCP servers as tools (issue 11), both ways: real servers run as the calling user, and
``aiosctl mcp serve`` used by a real MCP client session.

Servers: tests/mcp_server.py (written with the ``mcp`` SDK) configured system-wide twice,
untrusted (``testsrv``) and trusted (``trusted``); ``mcp-server-time`` from PyPI (it needs no
network) as ``time``; and one of alice's own, in her ``~/.config/aiosd/mcp.toml``.  Users:
``in`` (alice) and ``in2`` (bob), members of ``aios``, each connection made by a process of
theirs.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiosd.errors import InvalidParams
from tests.conftest import UnixUser
from tests.support import (
    REPO,
    Daemon,
    Streamed,
    UserClient,
    confirm,
    loop_over_ollama,
    module_daemon,
    owned,
    user_connections,
    user_home,
)

pytestmark = pytest.mark.e2e

SERVER = [sys.executable, str(REPO / "tests" / "mcp_server.py")]
TIME = [str(Path(sys.executable).parent / "mcp-server-time"), "--local-timezone", "UTC"]


def _toml_list(words: list[str]) -> str:
    return "[" + ", ".join(json.dumps(w) for w in words) + "]"


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    extra = f"""
[tools]
confirm_timeout = 3.0
mcp_start_timeout = 60.0

[tools.mcp.testsrv]
command = {_toml_list(SERVER)}

[tools.mcp.trusted]
command = {_toml_list(SERVER)}
trusted = true

[tools.mcp.time]
command = {_toml_list(TIME)}
trusted = true
"""
    with module_daemon("aiosd-mcp-", extra) as d:
        yield d


@pytest.fixture
def users(daemon: Daemon, unix_users: dict[str, UnixUser]) -> Iterator[Any]:
    with user_connections(daemon, unix_users) as open_:
        yield open_


def call(c: UserClient, tool: str, **arguments: Any) -> dict[str, Any]:
    out: dict[str, Any] = c.call("tool.call", {"name": tool, "arguments": arguments})
    return out


def text_of(result: dict[str, Any]) -> str:
    assert result["ok"], result
    return "".join(c["text"] for c in result["output"]["content"] if c["type"] == "text")


def _servers_of(uid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmd = Path(f"/proc/{name}/cmdline").read_bytes()
                st = Path(f"/proc/{name}/status").read_text()
            except OSError:
                continue
            uids = next(ln for ln in st.splitlines() if ln.startswith("Uid:")).split()[1:]
            if b"mcp_server.py" in cmd and b"setpriv" not in cmd and uids[0] == str(uid):
                out.append(int(name))
    return out


def test_servers_are_listed_and_run_as_the_caller(
    users: Any, unix_users: dict[str, UnixUser]
) -> None:
    a, b = unix_users["in"], unix_users["in2"]
    alice, bob = users("in"), users("in2")
    listed = alice.call("tool.list")
    tools = {t["name"]: t for t in listed["tools"]}
    assert listed["problems"] == []
    for name in ("testsrv.whoami", "trusted.whoami", "trusted.write_note", "time.get_current_time"):
        assert name in tools, sorted(tools)
    # An untrusted server's word is not taken: every tool of it is destructive.
    assert tools["testsrv.whoami"]["annotations"]["destructive"] is True
    assert tools["testsrv.whoami"]["needs_confirmation"] is True
    # A trusted one's is.
    assert tools["trusted.whoami"]["annotations"]["read_only"] is True
    assert tools["trusted.whoami"]["needs_confirmation"] is False
    assert tools["trusted.write_note"]["needs_confirmation"] is True
    assert tools["trusted.whoami"]["source"] == "mcp:trusted"
    assert tools["trusted.echo"]["parameters"]["required"] == ["text"]

    me = json.loads(text_of(call(alice, "trusted.whoami")))
    assert (me["uid"], me["euid"], me["gid"]) == (a.uid, a.uid, a.gid)
    assert sorted(me["groups"]) == sorted(set(a.groups))
    him = json.loads(text_of(call(bob, "trusted.whoami")))
    assert him["uid"] == b.uid and him["pid"] != me["pid"]  # an instance of his own
    for pid in _servers_of(a.uid):
        status = Path(f"/proc/{pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status


def test_the_kernel_decides_what_a_server_may_read(
    users: Any, unix_users: dict[str, UnixUser]
) -> None:
    b = unix_users["in2"]
    secret = owned(b, user_home(b) / "mcp-secret.txt", "bob's\n")
    try:
        r = call(users("in"), "trusted.read_file", path=str(secret))
        assert not r["ok"] and r["error"]["kind"] == "mcp"
        assert "Permission denied" in r["error"]["message"], r
        assert text_of(call(users("in2"), "trusted.read_file", path=str(secret))) == "bob's\n"
    finally:
        secret.unlink()


def test_failures_bad_arguments_and_a_crash(users: Any) -> None:
    alice = users("in")
    with pytest.raises(InvalidParams, match=r"arguments\.times: 'x' is not of type 'integer'"):
        call(alice, "trusted.echo", text="hi", times="x")
    failed = call(alice, "trusted.fail")
    assert not failed["ok"] and "this tool always fails" in failed["error"]["message"]
    assert text_of(call(alice, "trusted.echo", text="ab", times=2)) == "abab"
    crashed = call(alice, "trusted.crash")
    assert not crashed["ok"] and crashed["error"]["kind"] == "mcp", crashed
    assert "MCP server trusted: it ended (status 3)" in crashed["error"]["message"], crashed
    # Started again for the next call.
    assert text_of(call(alice, "trusted.echo", text="back")) == "back"


def test_an_untrusted_servers_tool_waits_for_consent(users: Any) -> None:
    r = None
    with pytest.raises(Exception, match="no answer to confirmation request"):
        r = call(users("in"), "testsrv.echo", text="hi")
    assert r is None


def test_a_server_from_pypi(users: Any) -> None:
    # It says nothing of its tools, which MCP then takes as destructive: it asks.
    s = Streamed(users("in"), "time.get_current_time", timezone="UTC")
    assert s.request()["tool"] == "time.get_current_time"
    confirm(users("in"), s.request()["id"], True)
    result, error = s.outcome()
    assert error is None and result is not None
    out = json.loads(text_of(result))
    assert out["timezone"] == "UTC" and "datetime" in out


def test_a_users_own_servers_are_hers(users: Any, unix_users: dict[str, UnixUser]) -> None:
    a = unix_users["in"]
    config = owned(a, user_home(a) / ".config", mode=0o700)
    owned(a, config / "aiosd", mode=0o700)
    mine = config / "aiosd" / "mcp.toml"
    owned(
        a,
        mine,
        f"[servers.mine]\ncommand = {_toml_list(SERVER)}\n\n"
        f"[servers.fs]\ncommand = {_toml_list(SERVER)}\n",
    )
    try:
        listed = users("in").call("tool.list")
        names = {t["name"]: t for t in listed["tools"]}
        assert "mine.whoami" in names and names["mine.whoami"]["needs_confirmation"]
        assert any("[servers.fs]" in p and "a server name" in p for p in listed["problems"])
        assert "mine.whoami" not in {t["name"] for t in users("in2").call("tool.list")["tools"]}
    finally:
        shutil.rmtree(config)


def test_the_tool_loop_calls_an_mcp_tool(unix_users: dict[str, UnixUser]) -> None:
    from tests.ollama_stub import OllamaStub

    mcp = f"[tools.mcp.trusted]\ncommand = {_toml_list(SERVER)}\ntrusted = true\n"
    with OllamaStub(reply="It said hello.", tool_arguments={"text": "hello"}) as stub:
        r = loop_over_ollama(
            unix_users["in"], stub.url, "Echo hello.", ["trusted.echo"], "aiosd-mcp-loop-", mcp
        )
    [step] = r["steps"]
    assert step["tool"] == "trusted.echo" and step["ok"], step
    assert step["output"]["content"] == [{"type": "text", "text": "hello"}]
    assert r["message"]["content"] == "It said hello."


def test_aiosctl_mcp_serve_in_a_real_client_session(
    daemon: Daemon, unix_users: dict[str, UnixUser]
) -> None:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    a, b = unix_users["in"], unix_users["in2"]
    mine = owned(a, user_home(a) / "served.txt", "served to a host\n")
    secret = owned(b, user_home(b) / "not-served.txt", "bob's\n")
    params = StdioServerParameters(
        command="/usr/sbin/runuser",
        args=[
            "-u",
            a.name,
            "--",
            sys.executable,
            "-m",
            "aiosd.cli",
            "--socket",
            str(daemon.socket_path),
            "mcp",
            "serve",
        ],  # fmt: skip
        env={"PATH": "/usr/bin:/bin", "HOME": str(user_home(a))},
        cwd=str(REPO),
    )

    async def session() -> dict[str, Any]:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            names = {t.name: t for t in (await s.list_tools()).tools}
            read_ok = await s.call_tool("fs_read", {"path": str(mine)})
            read_no = await s.call_tool("fs_read", {"path": str(secret)})
            stored = await s.call_tool(
                "storage_put", {"collection": "mcp", "key": "k", "value": "via mcp"}
            )
            asked = await s.call_tool("aiosd_ask", {"prompt": "Say hi.", "max_tokens": 8})
            return {"names": names, "ok": read_ok, "no": read_no, "stored": stored, "ask": asked}

    try:
        got = asyncio.run(asyncio.wait_for(session(), 120))
    finally:
        mine.unlink()
        secret.unlink()
    names = got["names"]
    assert {"fs_read", "fs_write", "system_info", "trusted_whoami", "aiosd_ask"} <= set(names)
    assert names["fs_write"].annotations.destructiveHint is True
    assert not got["ok"].isError
    assert json.loads(got["ok"].content[0].text)["text"] == "served to a host\n"
    assert got["no"].isError and "Permission denied" in got["no"].content[0].text
    assert not got["stored"].isError and not got["ask"].isError
    # Stored as alice: her storage has it.
    alice = UserClient(a, daemon.socket_path, 60)
    try:
        assert alice.call("storage.get", {"collection": "mcp", "key": "k"})["value"] == "via mcp"
    finally:
        alice.close()


def test_a_server_that_cannot_start_is_a_clear_problem(
    users: Any, unix_users: dict[str, UnixUser]
) -> None:
    a = unix_users["in"]
    config = owned(a, user_home(a) / ".config", mode=0o700)
    owned(a, config / "aiosd", mode=0o700)
    owned(
        a,
        config / "aiosd" / "mcp.toml",
        '[servers.gone]\ncommand = ["/no/such/program"]\n\n'
        '[servers.quits]\ncommand = ["/bin/sh", "-c", "echo not today >&2; exit 4"]\n',
    )
    try:
        problems = users("in").call("tool.list")["problems"]
    finally:
        shutil.rmtree(config)
    gone = [p for p in problems if p.startswith("MCP server gone (user): ")]
    quits = [p for p in problems if p.startswith("MCP server quits (user): ")]
    assert gone and "it ended (status 127)" in gone[0], problems
    assert quits == ["MCP server quits (user): it ended (status 4) (it said: not today)"], problems


def test_timeouts_and_the_output_cap(users: Any) -> None:
    alice = users("in")
    slow = alice.call(
        "tool.call", {"name": "trusted.sleep", "arguments": {"seconds": 30}, "timeout": 1}
    )
    assert not slow["ok"] and "no answer within 1 s: stopped" in slow["error"]["message"], slow
    assert text_of(call(alice, "trusted.echo", text="again")) == "again"  # started anew
    big = call(alice, "trusted.echo", text="x", times=300_000)
    assert not big["ok"] and big["error"]["kind"] == "output", big
    assert "over tools.max_output_bytes (262144)" in big["error"]["message"]

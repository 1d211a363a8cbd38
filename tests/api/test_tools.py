"""The tool manager (issue 11): tools run as the caller, the kernel decides, consent is policy.

Real users: ``in`` (alice) and ``in2`` (bob) are members of ``aios``; each connection of theirs
is made by a process of theirs (bench/peer.py), so the daemon knows them from the kernel.
Files are made in their real homes (0700, owned by them).  The test itself is root.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiosd.errors import InvalidParams, NotFound, PermissionDenied
from tests.conftest import UnixUser
from tests.support import (
    Daemon,
    Streamed,
    UserClient,
    confirm,
    loop_over_ollama,
    module_daemon,
    owned,
    user_connections,
    user_home,
    wait_until,
)

pytestmark = pytest.mark.e2e

#: Seconds a confirmation request waits in these tests.
CONFIRM_TIMEOUT = 3.0


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    extra = f"[tools]\nconfirm_timeout = {CONFIRM_TIMEOUT}\nworker_idle_timeout = 30.0\n"
    with module_daemon("aiosd-tools-", extra) as d:
        yield d


@pytest.fixture
def users(daemon: Daemon, unix_users: dict[str, UnixUser]) -> Iterator[Any]:
    with user_connections(daemon, unix_users) as open_:
        yield open_


@pytest.fixture
def alice_dir(unix_users: dict[str, UnixUser]) -> Iterator[Path]:
    """A fresh directory in alice's home, hers."""
    d = owned(
        unix_users["in"], user_home(unix_users["in"]) / f"tools-{secrets.token_hex(4)}", mode=0o700
    )
    yield d
    shutil.rmtree(d, ignore_errors=True)


def call(c: UserClient, tool: str, **arguments: Any) -> dict[str, Any]:
    out: dict[str, Any] = c.call("tool.call", {"name": tool, "arguments": arguments})
    return out


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _workers_of(uid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            st = _status(int(name))
        except OSError:
            continue
        if b"aiosd.osbridge.worker" in cmd and st["Uid"].split()[0] == str(uid):
            out.append(int(name))
    return out


# --- the registry ------------------------------------------------------------------------------


def test_the_registry_lists_and_describes_every_builtin(users: Any) -> None:
    alice = users("in")
    tools = {t["name"]: t for t in alice.call("tool.list")["tools"]}
    builtins = """fs.list fs.stat fs.read fs.search fs.du fs.write proc.list proc.info proc.signal
        system.info notify.send storage.search storage.get storage.put memory.search memory.add"""
    for name in builtins.split():
        assert name in tools, name
    w = tools["fs.write"]
    assert w["annotations"]["destructive"] and not w["annotations"]["read_only"]
    assert w["needs_confirmation"] and w["runs_as"] == "caller"
    assert (
        not tools["fs.read"]["needs_confirmation"] and tools["fs.read"]["annotations"]["read_only"]
    )
    assert tools["system.info"]["runs_as"] == "daemon"
    schema = alice.call("tool.describe", {"name": "fs.read"})["parameters"]
    assert schema["required"] == ["path"] and schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"path", "max_bytes", "offset"}
    with pytest.raises(NotFound, match="no tool 'fs.nope'"):
        alice.call("tool.describe", {"name": "fs.nope"})
    with pytest.raises(NotFound, match="no tool 'fs.nope'"):
        call(alice, "fs.nope")


def test_arguments_are_checked_against_the_schema(users: Any) -> None:
    alice = users("in")
    with pytest.raises(InvalidParams, match=r"arguments\.path: Field required \(tool fs.read\)"):
        call(alice, "fs.read")
    with pytest.raises(InvalidParams, match=r"arguments\.max_bytes"):
        call(alice, "fs.read", path="x", max_bytes=0)
    with pytest.raises(InvalidParams, match=r"arguments\.colour: Extra inputs"):
        call(alice, "fs.list", colour="red")


# --- as the caller, and the kernel decides -----------------------------------------------------


def test_file_tools_read_her_files_and_the_kernel_refuses_the_rest(
    users: Any, unix_users: dict[str, UnixUser], alice_dir: Path
) -> None:
    a, b = unix_users["in"], unix_users["in2"]
    alice = users("in")
    owned(a, alice_dir / "notes.txt", "buy leeks\nand bread\n")
    owned(a, alice_dir / "sub", mode=0o700)
    owned(a, alice_dir / "sub" / "deep.md", "nothing about leeks here? leeks!\n")
    rel = f"~/{alice_dir.name}"

    got = call(alice, "fs.read", path=f"{rel}/notes.txt")
    assert got["ok"], got
    assert got["output"]["text"] == "buy leeks\nand bread\n"
    assert got["output"]["path"] == str(alice_dir / "notes.txt")
    listing = call(alice, "fs.list", path=rel)["output"]
    assert [(e["name"], e["type"]) for e in listing["entries"]] == [
        ("notes.txt", "file"), ("sub", "directory")]  # fmt: skip
    st = call(alice, "fs.stat", path=f"{rel}/notes.txt")["output"]
    assert (st["user"], st["mode"], st["size"]) == (a.name, "0600", 20)
    found = call(alice, "fs.search", path=rel, contains="leeks")["output"]
    assert sorted((r["path"], r["line"]) for r in found["results"]) == [
        (str(alice_dir / "notes.txt"), 1), (str(alice_dir / "sub" / "deep.md"), 1)]  # fmt: skip
    named = call(alice, "fs.search", path=rel, name="*.md")["output"]
    assert [r["path"] for r in named["results"]] == [str(alice_dir / "sub" / "deep.md")]
    du = call(alice, "fs.du", path=rel)["output"]
    assert (du["files"], du["directories"]) == (2, 2) and du["bytes"] > 0

    # bob's home is 0700: the kernel refuses alice, and the result says it was the kernel.
    bobs = owned(b, user_home(b) / "secret.txt", "bob's\n")
    try:
        for tool, args in (("fs.list", {"path": str(user_home(b))}),
                           ("fs.read", {"path": str(bobs)}),
                           ("fs.read", {"path": "/etc/shadow"})):  # fmt: skip
            r = call(alice, tool, **args)
            assert not r["ok"], r
            e = r["error"]
            assert (e["kind"], e["code"], e["errno"]) == ("os", "EACCES", 13), e
            assert "the kernel refused it for " + a.name in e["message"]
        # Listing what she may not read does not show it either.
        search = call(alice, "fs.search", path=str(user_home(b)), contains="bob")
        assert not search["ok"] and search["error"]["code"] == "EACCES"
    finally:
        bobs.unlink()
    missing = call(alice, "fs.read", path="~/no-such-file")["error"]
    assert missing["code"] == "ENOENT"


def test_workers_run_as_the_caller_with_her_groups(
    users: Any, unix_users: dict[str, UnixUser]
) -> None:
    a = unix_users["in"]
    alice = users("in")
    assert call(alice, "fs.list", path="~")["ok"]
    pids = _workers_of(a.uid)
    assert pids, "alice's worker is not running"
    for pid in pids:
        st = _status(pid)
        assert st["Uid"].split() == [str(a.uid)] * 4
        assert st["Gid"].split() == [str(a.gid)] * 4
        assert sorted(int(g) for g in st["Groups"].split()) == sorted(set(a.groups))
        assert st["NoNewPrivs"] == "1"
        assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0
    # Kept warm: the next call takes the same worker.
    assert call(alice, "fs.stat", path="~")["ok"]
    assert set(_workers_of(a.uid)) == set(pids)
    # One that dies is replaced on the next call.
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not set(_workers_of(a.uid)) & set(pids), 10, "the worker to die")
    assert call(alice, "fs.stat", path="~")["ok"]
    assert set(_workers_of(a.uid)) - set(pids)


def test_root_gets_no_worker(daemon: Daemon) -> None:
    from aiosd.sdk import Client

    with Client(daemon.socket_path) as root:
        with pytest.raises(PermissionDenied, match="never as root"):
            root.call("tool.call", {"name": "fs.list", "arguments": {"path": "/"}})
        facts = root.call("tool.call", {"name": "system.info", "arguments": {}})
    assert facts["ok"] and facts["output"]["cpus"] == os.cpu_count()


def test_process_tools_see_like_ps_and_signal_only_her_own(
    users: Any, unix_users: dict[str, UnixUser]
) -> None:
    a, b = unix_users["in"], unix_users["in2"]
    alice = users("in")
    mine = subprocess.Popen(["/bin/sleep", "300"], user=a.uid, group=a.gid, cwd="/")
    bobs = subprocess.Popen(["/bin/sleep", "301"], user=b.uid, group=b.gid, cwd="/")
    roots = subprocess.Popen(["/bin/sleep", "302"], cwd="/")
    try:
        listed = call(alice, "proc.list", sort="pid", limit=1000, name="sleep")["output"]
        pids = {p["pid"]: p for p in listed["processes"]}
        assert {mine.pid, bobs.pid, roots.pid} <= set(pids)  # no hidepid here: ps sees all
        assert pids[bobs.pid]["user"] == b.name and pids[bobs.pid]["command"] == "/bin/sleep 301"
        own = call(alice, "proc.info", pid=mine.pid)["output"]
        assert own["cwd"] == "/" and own["user"] == a.name
        other = call(alice, "proc.info", pid=roots.pid)["output"]
        assert "cwd" not in other and "exe" not in other  # the owner's to know
        top = call(alice, "proc.list", sort="memory", limit=3)["output"]
        rss = [p["rss"] for p in top["processes"]]
        assert rss == sorted(rss, reverse=True) and len(rss) == 3

        # Signalling is destructive: allowed for this session first.
        s = Streamed(alice, "proc.signal", pid=mine.pid, signal="TERM")
        confirm(users("in"), s.request()["id"], True, "session")
        result, error = s.outcome()
        assert error is None and result is not None and result["ok"], (result, error)
        assert mine.wait(10) == -signal.SIGTERM
        for victim in (bobs, roots):
            r = call(alice, "proc.signal", pid=victim.pid, signal="KILL")
            assert not r["ok"] and r["error"]["code"] == "EPERM", r
            assert victim.poll() is None  # still running
    finally:
        for p in (mine, bobs, roots):
            p.kill()
            p.wait()


def test_storage_and_memory_tools_are_her_own_syscalls(users: Any) -> None:
    alice, bob = users("in"), users("in2")
    put = call(alice, "storage.put", collection="toolnotes", key="k1", value="tools remember leeks")
    assert put["ok"] and put["output"]["version"] >= 1
    assert alice.call("storage.get", {"collection": "toolnotes", "key": "k1"})["value"] == (
        "tools remember leeks"
    )
    hits = call(alice, "storage.search", query="leeks")["output"]["hits"]
    assert any(h["key"] == "k1" for h in hits)
    assert not any(
        h["key"] == "k1" for h in call(bob, "storage.search", query="leeks")["output"]["hits"]
    )
    got = call(bob, "storage.get", collection="toolnotes", key="k1")
    assert not got["ok"] and got["error"]["kind"] == "syscall"
    added = call(alice, "memory.add", content="the tool loop likes leeks")["output"]
    assert added["content"] == "the tool loop likes leeks"


def test_no_session_bus_is_a_clear_result(users: Any, unix_users: dict[str, UnixUser]) -> None:
    r = call(users("in"), "notify.send", summary="hello")
    assert r["ok"], r
    bus = f"/run/user/{unix_users['in'].uid}/bus"
    if os.path.exists(bus):
        pytest.fail(f"{bus} exists on this machine: this test needs a user without a session")
    assert r["output"] == {"delivered": False, "reason": f"no session: {bus} does not exist"}


# --- consent -----------------------------------------------------------------------------------


def test_a_destructive_call_waits_for_her_yes(
    users: Any, unix_users: dict[str, UnixUser], alice_dir: Path
) -> None:
    alice, bob = users("in"), users("in2")
    target = alice_dir / "written.txt"
    s = Streamed(alice, "fs.write", path=str(target), content="line one\n")
    req = s.request()
    assert req["tool"] == "fs.write"
    assert req["arguments"] == {"path": str(target), "content": "line one\n"}
    assert req["annotations"]["destructive"]
    # Shown where she looks from anywhere; not to bob, who cannot answer it either.
    other = users("in")
    assert [p["id"] for p in other.call("tool.pending")["requests"]] == [req["id"]]
    assert bob.call("tool.pending")["requests"] == []
    with pytest.raises(NotFound):
        confirm(bob, req["id"], True)
    assert not target.exists()
    assert confirm(other, req["id"], True)["allowed"] is True
    result, error = s.outcome()
    assert error is None and result is not None and result["ok"], (result, error)
    assert target.read_text() == "line one\n"
    assert target.stat().st_uid == unix_users["in"].uid  # written by her, as her
    assert target.stat().st_mode & 0o777 == 0o600  # umask 077: private unless she says


def test_no_and_silence_change_nothing(users: Any, alice_dir: Path) -> None:
    alice = users("in")
    target = alice_dir / "never.txt"
    s = Streamed(alice, "fs.write", path=str(target), content="x")
    confirm(users("in"), s.request()["id"], False)
    result, error = s.outcome()
    assert result is None and error is not None
    assert error["code"] == PermissionDenied.rpc_code and "you declined" in error["message"]
    assert error["data"]["reason"] == "declined"

    t0 = time.monotonic()
    s = Streamed(alice, "fs.write", path=str(target), content="x")
    s.request()
    result, error = s.outcome()
    assert error is not None and error["data"]["reason"] == "timeout", error
    assert f"within {CONFIRM_TIMEOUT:g} s" in error["message"]
    assert time.monotonic() - t0 >= CONFIRM_TIMEOUT - 0.5
    assert not target.exists()
    assert alice.call("tool.pending")["requests"] == []


def test_always_is_remembered_per_user_and_revocable(
    users: Any, alice_dir: Path, unix_users: dict[str, UnixUser]
) -> None:
    alice, bob = users("in"), users("in2")
    first = alice_dir / "a1.txt"
    s = Streamed(alice, "fs.write", path=str(first), content="1")
    confirm(users("in"), s.request()["id"], True, "always")
    assert s.outcome()[0]["ok"]  # type: ignore[index]
    try:
        assert users("in").call("tool.grants")["always"] == ["fs.write"]
        # A new connection of hers writes without asking...
        again = call(users("in"), "fs.write", path=str(alice_dir / "a2.txt"), content="2")
        assert again["ok"] and (alice_dir / "a2.txt").read_text() == "2"
        # ...bob's grant list is his own (empty), so his write would ask.
        assert bob.call("tool.grants")["always"] == []
        bob_tool = {t["name"]: t for t in bob.call("tool.list")["tools"]}["fs.write"]
        assert bob_tool["needs_confirmation"]
    finally:
        assert users("in").call("tool.revoke", {"name": "fs.write"})["revoked"] == ["fs.write"]
    assert users("in").call("tool.grants")["always"] == []
    s = Streamed(users("in"), "fs.write", path=str(alice_dir / "a3.txt"), content="3")
    confirm(users("in"), s.request()["id"], False)
    assert s.outcome()[1] is not None
    assert not (alice_dir / "a3.txt").exists()


# --- agents ------------------------------------------------------------------------------------


def agent_script(calls: list[tuple[str, dict[str, Any]]]) -> str:
    """An agent program: ``calls`` made on its socket, each answer printed as a JSON line."""
    return f"""
import json, os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["AIOSD_SOCKET"])
f = s.makefile("rb")
for i, (method, params) in enumerate({calls!r}, 1):
    frame = {{"jsonrpc": "2.0", "id": i, "method": method, "params": params}}
    s.sendall(json.dumps(frame).encode() + b"\\n")
    print(f.readline().decode(), end="", flush=True)
"""


SCRIPT = agent_script(
    [
        ("tool.list", {}),
        ("tool.call", {"name": "fs.read", "arguments": {"path": "~/x"}}),
        ("tool.confirm", {"request": "0123456789abcdef", "allow": True}),
        ("tool.revoke", {}),
    ]
)


def test_an_agent_gets_only_its_allowed_tools_and_cannot_consent(users: Any) -> None:
    alice = users("in")
    a = alice.call(
        "agent.spawn",
        {"argv": ["/usr/bin/python3", "-I", "-c", SCRIPT], "tools": ["fs.list", "fs.stat"]},
    )
    done = alice.call("agent.wait", {"aid": a["aid"], "timeout": 60})
    assert done["ended_in_time"] and done["exit_code"] == 0, done
    lines = [json.loads(x["text"]) for x in alice.call("agent.logs", {"aid": a["aid"]})["lines"]]
    listed, read, confirmed, revoked = lines
    assert [t["name"] for t in listed["result"]["tools"]] == ["fs.list", "fs.stat"]
    assert read["error"]["code"] == NotFound.rpc_code
    assert read["error"]["message"] == "no tool 'fs.read' that you may use (see tool.list)"
    assert confirmed["error"]["code"] == NotFound.rpc_code  # no such request of hers
    assert revoked["error"]["code"] == PermissionDenied.rpc_code
    assert "agents cannot change your tool grants" in revoked["error"]["message"]


def test_an_agent_cannot_answer_her_confirmation_requests(users: Any, alice_dir: Path) -> None:
    s = Streamed(users("in"), "fs.write", path=str(alice_dir / "agent-approved.txt"), content="no")
    req = s.request()
    alice = users("in")  # (the first connection's answers are the streamed call's reader's)
    script = agent_script([("tool.confirm", {"request": req["id"], "allow": True})])
    a = alice.call("agent.spawn", {"argv": ["/usr/bin/python3", "-I", "-c", script]})
    alice.call("agent.wait", {"aid": a["aid"], "timeout": 60})
    lines = [json.loads(x["text"]) for x in alice.call("agent.logs", {"aid": a["aid"]})["lines"]]
    [confirmed] = lines
    assert confirmed["error"]["code"] == PermissionDenied.rpc_code, confirmed
    assert "agents cannot answer confirmation requests" in confirmed["error"]["message"]
    # Still waiting for her: she says no.
    assert [p["id"] for p in users("in").call("tool.pending")["requests"]] == [req["id"]]
    confirm(users("in"), req["id"], False)
    assert s.outcome()[1] is not None
    assert not (alice_dir / "agent-approved.txt").exists()


# --- the tool loop on the embedded model -------------------------------------------------------

PROMPTS = [
    "List the files in my home directory.",
    "How loaded is this machine right now?",
    "Which processes use the most memory?",
    "Read the file notes.txt in my home.",
    "How much disk space does my home directory use?",
    "Find files named *.txt in my home.",
    "Search my storage for leeks.",
    "Remember that I like green tea.",
    "What do you remember about tea?",
    "Show details of process 1.",
]


def test_the_tool_loop_makes_only_schema_valid_calls(users: Any) -> None:
    from aiosd.managers.builtin_tools import BUILTINS

    models = {t.name: t.args for t in BUILTINS}
    alice = users("in")
    made = 0
    for prompt in PROMPTS:
        r = alice.call(
            "llm.chat",
            {
                "messages": [{"role": "user", "content": prompt}],
                "use_tools": ["fs.*", "proc.list", "proc.info", "system.info", "storage.search",
                              "memory.*"],
                "max_steps": 2,
                "max_tokens": 96,
            },
        )  # fmt: skip
        for step in r["steps"]:
            made += 1
            models[step["tool"]].model_validate(step["arguments"])  # the grammar's promise
            assert not (step["error"] or {}).get("message", "").startswith("invalid params"), step
        assert r["finish_reason"] in ("stop", "length", "max_steps", "tool_calls"), r
    assert made >= len(PROMPTS) // 2, f"only {made} calls over {len(PROMPTS)} prompts"


def test_the_tool_loop_over_ollama_uses_native_tool_calls(
    unix_users: dict[str, UnixUser], alice_dir: Path
) -> None:
    from tests.ollama_stub import OllamaStub

    owned(unix_users["in"], alice_dir / "seen-by-ollama.txt", "x")
    with OllamaStub(reply="You have one file.", tool_arguments={"path": str(alice_dir)}) as stub:
        prompt = "What is in my folder?"
        r = loop_over_ollama(unix_users["in"], stub.url, prompt, ["fs.list"], "aiosd-tools-ol-")
    [step] = r["steps"]
    assert (step["tool"], step["ok"], step["reply"]) == ("fs.list", True, 0), step
    assert [e["name"] for e in step["output"]["entries"]] == ["seen-by-ollama.txt"]
    assert r["message"]["content"] == "You have one file." and r["finish_reason"] == "stop"
    first, second = (q.body for q in stub.requests if q.path == "/api/chat")
    assert [t["function"]["name"] for t in first["tools"]] == ["fs.list"]
    from aiosd.managers.builtin_tools import BUILTINS

    [fs_list] = [t for t in BUILTINS if t.name == "fs.list"]
    assert first["tools"][0]["function"]["parameters"] == fs_list.schema()  # unchanged
    tool_turn = second["messages"][-1]
    assert tool_turn["role"] == "tool" and tool_turn["tool_name"] == "fs.list"
    assert json.loads(tool_turn["content"])["entries"][0]["name"] == "seen-by-ollama.txt"

"""The example agents that ship with aiosd (``aiosd/agents/``), run end to end on the embedded
model, and the SDK helper they are written with (:mod:`aiosd.sdk.agent`).

Both agents are started by name through ``agent.spawn`` by ``in`` (alice), over a connection
a process of hers makes (bench/peer.py), so they run as her: the files they read, the
storage they write and the memory they keep are hers.  The model is small and weak: the
tests check what the programs guarantee (what was stored, skipped, recalled and put in the
prompt), never whether an answer is right.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import aiosd.sdk.agent as sdk_agent
from aiosd.errors import Busy, NotFound
from aiosd.sdk import Client
from aiosd.sdk.agent import Agent, keywords, read_text
from tests.conftest import UnixUser
from tests.support import Daemon, UserClient, wait_until, write_config

pytestmark = pytest.mark.e2e

#: How long an agent may take on the model (a few short generations, at ~70-115 tokens/s,
#: behind whatever else the machine runs).
AGENT_TIMEOUT = 300


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-examples-"))
    directory.chmod(0o755)
    config = write_config(directory, slots=1, extra="[agents]\nwatch_interval = 0.05\n")
    d = Daemon(directory, config)
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0, d.log()


@pytest.fixture
def alice(daemon: Daemon, unix_users: dict[str, UnixUser]) -> Iterator[UserClient]:
    c = UserClient(unix_users["in"], daemon.socket_path, AGENT_TIMEOUT + 60)
    yield c
    c.close()


@pytest.fixture
def folder(unix_users: dict[str, UnixUser]) -> Iterator[Path]:
    """A folder of alice's in her home (made by root, given to her), removed afterwards."""
    me = unix_users["in"]
    path = Path(pwd.getpwnam(me.name).pw_dir) / f"examples-{secrets.token_hex(4)}"
    path.mkdir(mode=0o700)
    os.chown(path, me.uid, me.gid)
    yield path
    shutil.rmtree(path)


def _write(path: Path, data: bytes, owner: UnixUser | None, mode: int = 0o600) -> None:
    path.write_bytes(data)
    path.chmod(mode)
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)


def _run(c: UserClient, spawn: dict[str, Any], last: str) -> tuple[dict[str, Any], list[Any]]:
    """Start an agent, wait until it has ended and its output up to a line starting with
    ``last`` is in: its final record and its lines of output."""
    a = c.call("agent.spawn", spawn)
    done = c.call("agent.wait", {"aid": a["aid"], "timeout": AGENT_TIMEOUT})
    lines: list[Any] = []

    def complete() -> bool:
        lines[:] = c.call("agent.logs", {"aid": a["aid"], "tail": 1000})["lines"]
        return any(line["text"].startswith(last) for line in lines)

    assert done["ended_in_time"], done
    wait_until(complete, 10, f"{last!r} in the agent's output", lambda: lines)
    return done, lines


def _texts(lines: list[Any], stream: str) -> list[str]:
    return [line["text"] for line in lines if line["stream"] == stream]


# --- installed ---------------------------------------------------------------------------------


def test_both_examples_are_installed_as_builtin_agents(alice: UserClient) -> None:
    found = {m["name"]: m for m in alice.call("agent.available")["agents"]}
    for name in ("summarize", "chat"):
        assert found[name]["source"] == "builtin"
        assert found[name]["exec"] == [sys.executable, "-m", f"aiosd.agents.{name}"]
        assert found[name]["description"]


# --- summarize ---------------------------------------------------------------------------------


def test_summarize_stores_one_summary_per_text_file_in_the_owners_storage(
    daemon: Daemon, alice: UserClient, folder: Path, unix_users: dict[str, UnixUser]
) -> None:
    me = unix_users["in"]
    texts = {
        "lighthouse.txt": b"The old lighthouse on the north cape was built in 1872. Its keeper "
        b"climbs 120 steps every evening to light the lamp, which ships see 20 miles away.\n",
        "pancakes.txt": b"Pancakes: mix 200 g of flour, two eggs and 300 ml of milk. Rest the "
        b"batter for ten minutes, then fry thin pancakes in a hot buttered pan.\n",
    }
    for name, data in texts.items():
        _write(folder / name, data, me)
    _write(folder / "photo.bin", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)), me)
    # Root's, and only root may read it: the agent, running as alice, must not.
    _write(folder / "secret.txt", b"root's eyes only\n", None)
    (folder / "subfolder").mkdir()

    t0 = time.monotonic()
    # The folder as its argument: args follow the installed agent's own command line.
    done, lines = _run(alice, {"name": "summarize", "args": [str(folder)]}, "summarize:")
    took = time.monotonic() - t0
    out, err = _texts(lines, "stdout"), _texts(lines, "stderr")
    assert (done["state"], done["exit_code"]) == ("exited", 0), (done, lines)
    assert (done["user"], done["name"]) == (me.name, "summarize")
    assert done["argv"] == [sys.executable, "-m", "aiosd.agents.summarize", str(folder)]
    assert done["priority"] == "batch"  # from its agent.toml
    # One line per file summarised, in name order; a note for each file skipped.
    assert [line.split(":", 1)[0] for line in out] == sorted(texts), lines
    assert "skip photo.bin: binary (NUL bytes)" in err, err
    assert "skip secret.txt: cannot read: Permission denied" in err, err
    assert err[-1] == "summarize: 2 summaries stored in summaries"
    assert done["tokens_out"] > 0 and done["syscalls"] >= 5  # status, 2 chats, 2 puts

    for name, data in texts.items():
        got = alice.call("storage.get", {"collection": "summaries", "key": name})
        assert got["value"].strip() and "\n" not in got["value"]
        assert f"{name}: {got['value']}" in out
        assert got["metadata"] == {
            "source": str(folder / name),
            "size": len(data),
            "read_bytes": len(data),
            "truncated": False,
            "model": "smollm2",
            "agent": done["aid"],
        }
    for skipped in ("photo.bin", "secret.txt", "subfolder"):
        with pytest.raises(NotFound):
            alice.call("storage.get", {"collection": "summaries", "key": skipped})
    # Her storage, not the daemon's (root's): the agent's calls were hers.
    with Client(daemon.socket_path) as root:
        with pytest.raises(NotFound):
            root.call("storage.get", {"collection": "summaries", "key": "lighthouse.txt"})
    print(f"summarize: 2 files in {took:.1f} s, {done['tokens_out']} tokens out")


def test_summarize_reads_at_most_max_bytes_and_max_files(
    alice: UserClient, folder: Path, unix_users: dict[str, UnixUser]
) -> None:
    me = unix_users["in"]
    # "é" is two bytes: the limit of 9 bytes cuts the fifth in two, which is dropped.
    _write(folder / "a.txt", "éééééé and the rest of it\n".encode(), me)
    _write(folder / "b.txt", b"never read: beyond SUMMARIZE_MAX_FILES\n", me)
    env = {
        "SUMMARIZE_DIR": str(folder),
        "SUMMARIZE_MAX_FILES": "1",
        "SUMMARIZE_MAX_BYTES": "9",
        "SUMMARIZE_MAX_TOKENS": "16",
        "SUMMARIZE_COLLECTION": "bounded",
    }
    done, lines = _run(alice, {"name": "summarize", "env": env}, "summarize:")
    assert done["exit_code"] == 0, lines
    got = alice.call("storage.get", {"collection": "bounded", "key": "a.txt"})
    assert (got["metadata"]["read_bytes"], got["metadata"]["truncated"]) == (8, True)
    assert "note: only the first 1 of 2 entries were looked at" in _texts(lines, "stderr")[0]
    with pytest.raises(NotFound):
        alice.call("storage.get", {"collection": "bounded", "key": "b.txt"})


# --- chat --------------------------------------------------------------------------------------


def test_chat_remembers_an_exchange_and_recalls_it_into_a_later_prompt(
    alice: UserClient, folder: Path, unix_users: dict[str, UnixUser]
) -> None:
    me = unix_users["in"]
    first, second = "My cat is called Tilly.", "What is my cat called?"
    _write(folder / "input.txt", f"{first}\n\n{second}\n".encode(), me)
    spawn = {"name": "chat", "env": {"CHAT_INPUT": str(folder / "input.txt"), "CHAT_DEBUG": "1"}}
    t0 = time.monotonic()
    done, lines = _run(alice, spawn, "# transcript")
    took = time.monotonic() - t0
    assert (done["state"], done["exit_code"]) == ("exited", 0), (done, lines)
    aid, space = done["aid"], done["memory_space"]
    assert space == f"agent-{aid}"
    out, err = _texts(lines, "stdout"), _texts(lines, "stderr")
    assert out[0] == f"> {first}" and out[3] == f"> {second}", out
    notes = [re.fullmatch(r"# recalled \[([\d, ]*)\] remembered (\d+)", t) for t in out[2::3]]
    assert all(notes[:2]) and len(out) == 7, out
    recalled = [[int(x) for x in m[1].split(",") if x.strip()] for m in notes[:2] if m]
    remembered = [int(m[2]) for m in notes[:2] if m]
    # The first exchange: nothing to recall yet; remembered in the agent's own space, pinned
    # so that it outlives the agent (then it is kept in her storage).
    assert recalled[0] == []
    hits = alice.call("memory.search", {"query": "Tilly", "space": space})["hits"]
    assert remembered[0] in [h["id"] for h in hits], hits
    entry = alice.call("memory.get", {"id": remembered[0], "space": space})
    answer = out[1].removeprefix("< ")
    assert entry["content"].startswith(f"User: {first}\nAssistant: ")
    assert " ".join(entry["content"].split("\nAssistant: ", 1)[1].split()) == answer
    assert (entry["tags"], entry["pinned"]) == (["exchange"], True)
    # The agent recalled it for the second message, into that message's prompt.
    assert remembered[0] in recalled[1]
    prompts = [json.loads(t.split(": ", 1)[1]) for t in err if t.startswith("prompt ")]
    assert len(prompts) == 2
    assert [m["role"] for m in prompts[0]] == ["system", "user"]
    assert "remember" not in prompts[0][0]["content"]
    system, user = prompts[1]
    assert (system["role"], user) == ("system", {"role": "user", "content": second})
    assert f"- User: {first}" in system["content"]
    # The transcript, in her storage, keyed by the date.
    key = out[-1].removeprefix("# transcript chats/")
    assert key.startswith(time.strftime("%Y-%m-%d/", time.gmtime())) and key.endswith(aid)
    got = alice.call("storage.get", {"collection": "chats", "key": key})
    said = got["value"].splitlines()
    assert said[0::2] == [f"user: {first}", f"user: {second}"]
    assert [t.split(": ", 1)[0] for t in said[1::2]] == ["assistant", "assistant"]
    assert got["metadata"]["agent"] == aid and got["metadata"]["space"] == space
    assert got["metadata"]["turns"] == [
        {"recalled": r, "remembered": m, "pinned": True}
        for r, m in zip(recalled, remembered, strict=True)
    ]
    print(f"chat: 2 messages in {took:.1f} s, {done['tokens_out']} tokens out")


def test_chat_reads_an_inbox_key_and_keeps_memory_in_a_named_space(alice: UserClient) -> None:
    space = f"examples-{secrets.token_hex(3)}"
    alice.call("storage.put", {"collection": "inbox", "key": "today", "value": "Hello there!\n"})
    env = {"CHAT_INBOX": "today", "CHAT_SPACE": space, "CHAT_PIN": "0"}
    done, lines = _run(alice, {"name": "chat", "env": env}, "# transcript")
    assert done["exit_code"] == 0, lines
    assert _texts(lines, "stdout")[0] == "> Hello there!"
    # A named space is not the agent's: its unpinned entries outlive the agent.
    hits = alice.call("memory.search", {"query": "hello", "space": space})["hits"]
    assert [(h["id"], h["pinned"], h["evicted"]) for h in hits] == [(1, False, False)]
    alice.call("memory.clear", {"space": space})


def test_chat_without_input_says_so_and_exits_2(alice: UserClient) -> None:
    done, lines = _run(alice, {"name": "chat"}, "chat:")
    assert done["exit_code"] == 2
    assert _texts(lines, "stderr") == [
        "chat: no messages: set CHAT_INPUT (a file), CHAT_MESSAGES or CHAT_INBOX"
    ]


# --- the SDK helper, without a daemon ----------------------------------------------------------


class FakeDaemon:
    """Just enough of memory.*, llm.chat, storage.put and system.status, in process: a
    memory.search matches entries holding every word of its query, as the daemon's does."""

    def __init__(self, busy: int = 0) -> None:
        self.memory: dict[int, str] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.busy = busy

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        p = params or {}
        self.calls.append((method, p))
        if method == "system.status":
            return {"caller_aid": "0123456789ab", "caller_uid": 999, "caller_role": "user"}
        if method == "memory.add":
            n = len(self.memory) + 1
            self.memory[n] = p["content"]
            return {"id": n, "space": p.get("space", "agent-0123456789ab")}
        if method == "memory.search":
            words = p["query"].lower().split()
            hits = [
                {"id": i, "content": c, "score": float(sum(c.lower().count(w) for w in words))}
                for i, c in self.memory.items()
                if all(w in c.lower() for w in words)
            ]
            return {"hits": sorted(hits, key=lambda h: -h["score"])[: p["limit"]]}
        if method == "llm.chat":
            if self.busy:
                self.busy -= 1
                raise Busy("the queue is full")
            return {"model": "fake", "message": {"content": f" answer {len(self.calls)} "}}
        if method == "storage.put":
            return {"collection": p["collection"], "key": p["key"], "version": 1}
        raise AssertionError(method)


def test_keywords_leave_out_stopwords_short_words_and_repeats() -> None:
    assert keywords("What is my cat called? My CAT, Tilly_2!") == ["cat", "called", "tilly"]
    assert keywords("is it? a no") == []
    assert len(keywords(" ".join(f"word{i}" for i in range(20)))) == 8


def test_agent_chat_recalls_by_any_shared_word_and_remembers_each_exchange() -> None:
    fake = FakeDaemon()
    agent = Agent(fake, max_tokens=32)
    assert agent.identity().space == "agent-0123456789ab"
    first = agent.chat("My cat is called Tilly.")
    assert (first.recalled, first.remembered) == ([], 1) and first.text.startswith("answer")
    assert first.messages == [{"role": "user", "content": "My cat is called Tilly."}]
    agent.remember("The dog is called Rex.")
    before = len(fake.calls)
    # "what", "is", "my" are not searched: every word of a search must occur, so the whole
    # question would find nothing.  Entry 1 holds both "cat" and "called", entry 2 one.
    second = agent.chat("What is my cat called?", recall=1, system="Be brief.")
    assert [m.id for m in second.recalled] == [1]
    assert second.messages[0]["content"] == (
        f"Be brief.\nWhat you remember from earlier in this conversation:\n"
        f"- User: My cat is called Tilly.\nAssistant: {first.text}"
    )
    searched = [p["query"] for m, p in fake.calls[before:] if m == "memory.search"]
    assert searched == ["cat", "called"]
    assert [p["max_tokens"] for m, p in fake.calls if m == "llm.chat"] == [32, 32]
    assert all("space" not in p for m, p in fake.calls if m.startswith("memory."))
    assert agent.chat("Tilly?", remember=False, recall=0).remembered is None
    assert len(fake.memory) == 3


def test_agent_retries_a_busy_model_and_names_a_space(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sdk_agent, "BUSY_TRIES", 2)
    fake = FakeDaemon(busy=1)
    agent = Agent(fake, space="notes")
    t0 = time.monotonic()
    assert agent.chat("hello there").text.startswith("answer")
    assert 0.4 < time.monotonic() - t0 < 3  # one wait of 0.5 s
    assert {p.get("space") for m, p in fake.calls if m.startswith("memory.")} == {"notes"}
    assert agent.store("c", "k", "v", {"a": 1}) == {"collection": "c", "key": "k", "version": 1}
    with pytest.raises(Busy):
        Agent(FakeDaemon(busy=99)).complete([{"role": "user", "content": "x"}], max_tokens=1)


def test_read_text_refuses_binary_and_keeps_a_cut_character_out(tmp_path: Path) -> None:
    (tmp_path / "t").write_bytes("aé".encode() * 3)
    assert read_text(tmp_path / "t", 100) == ("aéaéaé", False)
    assert read_text(tmp_path / "t", 5) == ("aéa", True)  # the 2nd é cut in two
    (tmp_path / "b").write_bytes(b"text\0more")
    with pytest.raises(ValueError, match="NUL"):
        read_text(tmp_path / "b", 100)
    (tmp_path / "l").write_bytes(b"\xff\xfe latin")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text(tmp_path / "l", 100)
    with pytest.raises(ValueError, match="regular"):
        read_text(tmp_path, 100)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match="regular"):
        read_text(tmp_path / "fifo", 100)  # does not block

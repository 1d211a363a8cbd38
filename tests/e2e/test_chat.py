"""LLM syscalls through the real daemon and the real embedded model (SmolLM2)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from aiosd.kernel.llm.llamacpp import default_model_path
from aiosd.sdk import AsyncClient, Client
from tests.support import REPO, Daemon, RawClient, write_config

pytestmark = pytest.mark.e2e

PROMPT = "Name three Linux init systems"


def _daemon(slots: int) -> Iterator[Daemon]:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-chat-"))
    d = Daemon(directory, write_config(directory, slots=slots))
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def daemon2() -> Iterator[Daemon]:
    """A daemon with 2 slots."""
    yield from _daemon(2)


@pytest.fixture(scope="module")
def daemon1() -> Iterator[Daemon]:
    """A daemon with 1 slot."""
    yield from _daemon(1)


def test_aiosctl_ask_streams_the_models_own_answer(daemon2: Daemon) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiosd.cli",
            "--socket",
            str(daemon2.socket_path),
            "ask",
            "--max-tokens",
            "48",
            PROMPT,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    # The same greedy generation straight through llama-cpp-python, in this process.
    from llama_cpp import Llama

    llama = Llama(model_path=str(default_model_path()), n_ctx=2048, n_threads=1, verbose=False)
    direct = llama.create_chat_completion(
        messages=[{"role": "user", "content": PROMPT}], temperature=0.0, max_tokens=48
    )["choices"][0]["message"]["content"]
    assert len(direct) > 20
    assert out.stdout.strip() == direct.strip()


def test_streaming_arrives_in_many_notifications_then_the_result(daemon2: Daemon) -> None:
    with Client(daemon2.socket_path) as client:
        notes = list(
            client.stream(
                "llm.chat",
                {
                    "messages": [{"role": "user", "content": PROMPT}],
                    "max_tokens": 32,
                    "stream": True,
                },
            )
        )
        result = client.last_result
    assert len(notes) > 1
    assert [n["seq"] for n in notes] == list(range(len(notes)))
    assert "".join(n["content"] for n in notes) == result["message"]["content"]
    assert result["usage"]["completion_tokens"] == 32
    assert result["finish_reason"] == "length"


def test_aiosctl_ask_json_prints_one_result(daemon2: Daemon) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiosd.cli",
            "--socket",
            str(daemon2.socket_path),
            "ask",
            "--json",
            "--max-tokens",
            "8",
            PROMPT,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["model"] == "smollm2"
    assert result["usage"]["completion_tokens"] == 8
    assert result["message"]["content"]


def test_json_schema_answer_validates(daemon2: Daemon) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "init_systems": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["name", "init_systems"],
    }
    with Client(daemon2.socket_path) as client:
        result = client.call(
            "llm.chat",
            {
                "messages": [{"role": "user", "content": f"{PROMPT}. Answer in JSON."}],
                "response_schema": schema,
                "max_tokens": 200,
            },
        )
    assert result["finish_reason"] == "stop"
    jsonschema.validate(json.loads(result["message"]["content"]), schema)


def test_prompt_larger_than_context_is_refused_with_both_sizes(daemon2: Daemon) -> None:
    client = RawClient(daemon2.socket_path)
    reply = client.call("llm.chat", {"messages": [{"role": "user", "content": "word " * 5000}]})
    client.close()
    err = reply["error"]
    assert err["code"] == -32003
    assert err["data"]["context_length"] == 2048
    assert err["data"]["prompt_tokens"] > 2048
    assert str(err["data"]["prompt_tokens"]) in err["message"] and "2048" in err["message"]


def _queue(path: Path) -> dict[str, Any]:
    with Client(path) as c:
        return c.call("system.queue")["models"][0]  # type: ignore[no-any-return]


def test_eight_clients_on_two_slots_in_priority_then_arrival_order(daemon2: Daemon) -> None:
    plan: list[tuple[str, int]] = [
        ("batch", 60),
        ("batch", 120),  # start at once, finish far apart
        ("batch", 8),
        ("batch", 8),
        ("batch", 8),
        ("batch", 8),  # wait
        ("normal", 8),
        ("interactive", 8),  # arrive last, jump the batch requests
    ]
    snapshots: list[dict[str, Any]] = []
    stop = threading.Event()

    def poll() -> None:
        with Client(daemon2.socket_path) as c:
            while not stop.is_set():
                snapshots.append(c.call("system.queue")["models"][0])
                time.sleep(0.01)

    async def run() -> list[dict[str, Any]]:
        async def one(prio: str, tokens: int, i: int) -> dict[str, Any]:
            async with AsyncClient(daemon2.socket_path) as c:
                return await c.call(
                    "llm.chat",
                    {
                        "messages": [{"role": "user", "content": f"Story number {i} about a cat"}],
                        "max_tokens": tokens,
                        "priority": prio,
                    },
                )

        tasks = []
        for i, (prio, tokens) in enumerate(plan):
            tasks.append(asyncio.create_task(one(prio, tokens, i)))
            # Arrival order is the order of submission: wait until the daemon has queued it.
            while True:
                q = await asyncio.to_thread(_queue, daemon2.socket_path)
                if len(q["running"]) + len(q["waiting"]) >= min(i + 1, 8):
                    break
                await asyncio.sleep(0.005)
        return await asyncio.gather(*tasks)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        results = asyncio.run(run())
    finally:
        stop.set()
        poller.join()

    assert len(results) == 8
    assert all(r["message"]["content"] for r in results)
    ids = [r["request_id"] for r in results]
    prio_of = {ids[i]: plan[i][0] for i in range(8)}
    # The fullest snapshot: 2 running, 6 waiting, in priority-then-arrival order.
    full = max(snapshots, key=lambda s: len(s["waiting"]))
    waiting = [w["request_id"] for w in full["waiting"]]
    assert len(full["running"]) == 2 and len(waiting) == 6
    expected = sorted(
        waiting, key=lambda rid: (["interactive", "normal", "batch"].index(prio_of[rid]), rid)
    )
    assert waiting == expected
    assert [w["position"] for w in full["waiting"]] == [1, 2, 3, 4, 5, 6]
    assert all(w["uid"] == 0 for w in full["waiting"])
    # Start order: the interactive request started before every batch request still waiting.
    first_running: dict[int, int] = {}
    for n, snap in enumerate(snapshots):
        for r in snap["running"]:
            first_running.setdefault(r["request_id"], n)
    interactive = ids[7]
    waiting_batch = [rid for rid in waiting if prio_of[rid] == "batch"]
    assert len(waiting_batch) == 4
    for rid in waiting_batch:
        assert first_running[interactive] < first_running[rid]


KILLED_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "llm.chat", "params": {
    "messages": [{"role": "user", "content": "Write a very long story"}],
    "max_tokens": 1500, "stream": True}}).encode() + b"\\n")
f = s.makefile("rb")
f.readline()
print("streaming", flush=True)
f.readline()
import time; time.sleep(600)
"""


def test_killed_client_frees_its_slot_promptly(daemon1: Daemon) -> None:
    victim = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, str(daemon1.socket_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert victim.stdout is not None
        assert victim.stdout.readline().strip() == "streaming"
        # The next request queues behind the victim's 1500-token generation on the one slot.
        client = RawClient(daemon1.socket_path)
        client.send(
            {
                "jsonrpc": "2.0",
                "id": 7,
                "method": "llm.chat",
                "params": {
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                    "stream": True,
                },
            }
        )
        deadline = time.monotonic() + 10
        while not _queue(daemon1.socket_path)["waiting"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        first = client.recv()  # first token of the next request
        started_after = time.monotonic() - killed_at
        assert first["method"] == "stream" and first["params"]["id"] == 7
        assert started_after < 1.0, f"next request started {started_after:.2f}s after the kill"
        while "result" not in (reply := client.recv()):
            pass
        assert reply["result"]["usage"]["completion_tokens"] == 4
        client.close()
        q = _queue(daemon1.socket_path)
        assert q["running"] == [] and q["waiting"] == []
    finally:
        victim.kill()
        victim.wait()

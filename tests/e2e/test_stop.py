"""SIGTERM during generations: finish what can, refuse what waits, cut what takes too long."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import Daemon, RawClient, queue_of, story_request, wait_until, write_config

pytestmark = pytest.mark.e2e

PREFILL_WORDS = 500  # a prompt of about 500 tokens: seconds of prefill on one thread


def _final(client: RawClient) -> dict[str, object]:
    while "method" in (msg := client.recv()):
        pass
    return msg


def _wait_queue(observer: RawClient, condition: Callable[[dict[str, Any]], bool]) -> None:
    """Wait until the model's queue (``system.queue``) satisfies ``condition``."""
    wait_until(lambda: condition(queue_of(observer)), 30, "such queue", lambda: queue_of(observer))


def _start(drain: float) -> Daemon:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-stop-"))
    config = write_config(directory, slots=1)
    config.write_text(config.read_text().replace("drain_timeout = 5.0", f"drain_timeout = {drain}"))
    d = Daemon(directory, config)
    d.wait_ready()
    return d


def test_running_generation_finishes_and_waiting_one_is_refused() -> None:
    d = _start(drain=20.0)
    try:
        running, waiting = RawClient(d.socket_path), RawClient(d.socket_path)
        observer = RawClient(d.socket_path)
        running.send(story_request(1, 40))
        assert running.recv()["method"] == "stream"  # it holds the only slot now
        waiting.send(story_request(2, 40))
        _wait_queue(observer, lambda q: len(q["waiting"]) == 1)  # queued behind it
        observer.close()
        d.proc.send_signal(signal.SIGTERM)
        refused = _final(waiting)
        assert refused["error"]["code"] == -32010  # type: ignore[index]
        done = _final(running)
        assert done["result"]["usage"]["completion_tokens"] == 40  # type: ignore[index]
        assert d.proc.wait(30) == 0
        assert "STOPPING=1" in d.notify.fields()
    finally:
        d.stop()


def test_generation_longer_than_the_drain_timeout_is_cancelled_with_an_error() -> None:
    d = _start(drain=1.0)
    try:
        client = RawClient(d.socket_path)
        client.send(story_request(1, 1500))
        assert client.recv()["method"] == "stream"
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        reply = _final(client)
        assert reply["error"]["code"] == -32010  # type: ignore[index]
        assert "stopped before this request finished" in reply["error"]["message"]  # type: ignore[index]
        assert d.proc.wait(30) == 0
        # drain (1 s) + cancellation at the next token boundary + close: well inside the
        # unit's TimeoutStopSec=30.
        assert time.monotonic() - t0 < 10
    finally:
        d.stop()


def test_zero_drain_cancels_at_once_and_stop_during_prefill_is_safe() -> None:
    d = _start(drain=0.0)
    try:
        client, observer = RawClient(d.socket_path), RawClient(d.socket_path)
        # A long prompt: the stop lands while llama.cpp is still evaluating it. Long enough
        # for seconds of prefill, not more: the stop waits for the prefill to end.
        client.send(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "llm.chat",
                "params": {
                    "messages": [{"role": "user", "content": "lighthouse " * PREFILL_WORDS}],
                    "max_tokens": 50,
                    "stream": True,
                },
            }
        )
        # Holding the slot: its prefill has begun (the signal follows within milliseconds).
        _wait_queue(observer, lambda q: len(q["running"]) == 1)
        observer.close()
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        # Cancelled before its first token, so during the prefill: no stream note came first.
        reply = client.recv()
        assert "method" not in reply, f"a token came before the stop landed: {reply}"
        assert reply["error"]["code"] == -32010, reply  # ShuttingDown
        assert d.proc.wait(30) == 0, d.log()  # no crash from freeing a busy context
        # At once: no drain at all, the stop cancelled it without waiting.
        # The stop says, by name, what it cancelled: the syscall and the caller's identity.
        assert (
            f"cancelling 1 request(s) still running after 0.0s: llm.chat (uid {os.getuid()}, "
            f"pid {os.getpid()})" in d.log()
        ), d.log()
        assert "waiting up to 0.0s" in d.log()
        assert time.monotonic() - t0 < 25
    finally:
        d.stop()

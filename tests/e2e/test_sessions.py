"""Chat sessions with the real model: turns are kept, replayed, and moved out when too long."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from aiosd.sdk import Client
from tests.support import REPO, Daemon, write_config

pytestmark = pytest.mark.e2e


def _daemon(n_ctx: int) -> Daemon:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-session-"))
    config = write_config(directory, slots=1)
    config.write_text(config.read_text().replace("n_ctx = 2048", f"n_ctx = {n_ctx}"))
    d = Daemon(directory, config)
    d.wait_ready()
    return d


def _ask(d: Daemon, session: str, text: str, *extra: str) -> tuple[dict, str]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiosd.cli",
            "--socket",
            str(d.socket_path),
            "ask",
            "--json",
            "--session",
            session,
            "--max-tokens",
            "24",
            *extra,
            text,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def test_three_turn_conversation_keeps_its_turns() -> None:
    d = _daemon(2048)
    try:
        questions = [
            "My cat is called Biscuit.",
            "She likes to sleep on the piano.",
            "What is my cat called?",
        ]
        results = [_ask(d, "pets", q)[0] for q in questions]
        assert [r["session"]["replayed"] for r in results] == [0, 2, 4]
        assert all(r["session"]["moved"] == 0 and r["notes"] == [] for r in results)
        # Each call's prompt holds the earlier turns: it grows by at least their text.
        prompts = [r["usage"]["prompt_tokens"] for r in results]
        assert prompts[0] < prompts[1] < prompts[2]
        with Client(d.socket_path) as c:
            hits = c.call("memory.search", {"query": "Biscuit", "space": "chat.pets"})
            assert any("Biscuit" in h["content"] for h in hits["hits"])
            replies = c.call(
                "memory.search",
                {"query": results[0]["message"]["content"].split()[0], "space": "chat.pets"},
            )
            assert replies["hits"]
        # Another session starts empty.
        other, _ = _ask(d, "other", "Hello")
        assert other["session"]["replayed"] == 0
    finally:
        assert d.stop() == 0


def test_tiny_context_moves_the_oldest_turns_out_and_says_so() -> None:
    d = _daemon(256)  # room for a few turns only (a quarter is kept for the answer)
    try:
        moved_note = ""
        result: dict = {}
        for i in range(6):
            result, stderr = _ask(
                d,
                "long",
                f"Tell me fact number {i} about lighthouses, in one or two sentences please.",
            )
            if result["session"]["moved"]:
                moved_note = stderr
                break
        assert result["session"]["moved"] >= 1, result
        assert "moved to storage" in moved_note and "chat.long" in moved_note
        assert result["notes"] and "moved to storage" in result["notes"][0]
        # What was kept fits with room left for the answer (24 tokens asked for).
        assert result["usage"]["prompt_tokens"] + 24 < 256
        with Client(d.socket_path) as c:
            hits = c.call("memory.search", {"query": "fact number 0", "space": "chat.long"})
            assert any(h["evicted"] for h in hits["hits"])
    finally:
        assert d.stop() == 0

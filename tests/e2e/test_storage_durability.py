"""Acknowledged writes survive SIGKILL of the daemon at any moment; damage is never hidden."""

from __future__ import annotations

import json
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from aiosd.errors import AiosError
from aiosd.sdk import Client
from tests.support import Daemon, write_config

pytestmark = pytest.mark.e2e

WRITER = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
f = s.makefile("rb")
acks = open(sys.argv[2], "a", buffering=1)
i = 0
while True:
    value = f"value {i} " + "x" * (i % 300)
    s.sendall(json.dumps({"jsonrpc": "2.0", "id": i, "method": "storage.put", "params": {
        "collection": "journal", "key": f"k{i % 500}", "value": value}}).encode() + b"\\n")
    try:
        line = f.readline()
    except ConnectionError:
        break
    if not line:
        break
    reply = json.loads(line)
    if "result" not in reply:
        break
    # Recorded only once the daemon has acknowledged the write.
    acks.write(json.dumps([f"k{i % 500}", value, reply["result"]["version"]]) + "\\n")
    i += 1
"""


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_acknowledged_puts_survive_sigkill(durability: str) -> None:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-durable-"))
    config = write_config(directory, extra=f'\n[storage]\ndurability = "{durability}"\n', slots=1)
    d = Daemon(directory, config)
    acks_file = directory / "acks.jsonl"
    d.wait_ready()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(d.socket_path), str(acks_file)])
    try:
        deadline = time.monotonic() + 60
        while not acks_file.exists() or len(acks_file.read_text().splitlines()) < 300:
            assert time.monotonic() < deadline, "the writer made too little progress"
            time.sleep(0.01)
        d.proc.send_signal(signal.SIGKILL)  # in the middle of the stream of puts
        d.proc.wait(10)
        writer.wait(10)
    finally:
        writer.kill()
        d.stop()
    acked = [json.loads(line) for line in acks_file.read_text().splitlines() if line.strip()]
    assert len(acked) >= 300
    latest: dict[str, tuple[str, int]] = {}
    for key, value, version in acked:
        latest[key] = (value, version)

    db = directory / "state" / "storage" / "0.sqlite"
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()

    again = Daemon(directory, config)
    try:
        again.wait_ready()
        with Client(again.socket_path) as c:
            for key, (value, version) in latest.items():
                got = c.call("storage.get", {"collection": "journal", "key": key})
                # The newest acknowledged write is there (a later, unacknowledged one may be too).
                assert got["version"] >= version, key
                if got["version"] == version:
                    assert got["value"] == value
                old = c.call(
                    "storage.get", {"collection": "journal", "key": key, "version": version}
                )
                assert old["value"] == value
    finally:
        assert again.stop() == 0


def test_a_damaged_database_is_moved_aside_never_silently_reset() -> None:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-corrupt-"))
    config = write_config(directory, slots=1)
    d = Daemon(directory, config)
    d.wait_ready()
    with Client(d.socket_path) as c:
        for i in range(200):
            c.call("storage.put", {"collection": "c", "key": f"k{i}", "value": "v" * 500})
    assert d.stop() == 0
    db = directory / "state" / "storage" / "0.sqlite"
    data = bytearray(db.read_bytes())
    for offset in range(4096, len(data), 4096):  # scribble over every page but the header
        data[offset + 100 : offset + 400] = b"\xde\xad" * 150
    db.write_bytes(bytes(data))

    again = Daemon(directory, config)
    try:
        again.wait_ready()
        with Client(again.socket_path) as c:
            # The call that finds the damage says so; the next one has a fresh, empty store.
            with pytest.raises(AiosError, match="was found damaged .* moved aside to 0.sqlite"):
                c.call("storage.usage", {})
            assert c.call("storage.usage", {})["used_entries"] == 0
        log = again.log()
        assert "failed its integrity check" in log and "moved" in log
        aside = list(db.parent.glob("0.sqlite.corrupt-*"))
        assert aside and aside[0].read_bytes()[:16] == b"SQLite format 3\x00"
    finally:
        assert again.stop() == 0


def test_pinned_memory_survives_a_restart_and_purge_frees_bytes() -> None:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-pinned-"))
    config = write_config(directory, slots=1)
    d = Daemon(directory, config)
    d.wait_ready()
    client = Client(d.socket_path)
    kept = client.call(
        "memory.add", {"content": "the user likes leeks", "pinned": True, "space": "prefs"}
    )
    client.call("memory.add", {"content": "a passing thought", "space": "prefs"})
    session = client.call("memory.add", {"content": "pinned in my session", "pinned": True})
    used = client.call("storage.usage", {})["used_bytes"]
    client.call("storage.put", {"collection": "c", "key": "k", "value": "x" * 5000})
    client.call("storage.put", {"collection": "c", "key": "k", "value": "y" * 5000})
    assert client.call("storage.usage", {})["used_bytes"] > used + 10000
    purged = client.call("storage.delete", {"collection": "c", "key": "k", "purge": True})
    assert purged["deleted"] and client.call("storage.usage", {})["used_bytes"] == used
    d.proc.send_signal(signal.SIGTERM)  # with the connection still open
    assert d.proc.wait(30) == 0
    d.stop()
    again = Daemon(directory, config)
    try:
        again.wait_ready()
        with Client(again.socket_path) as c:
            got = c.call("memory.get", {"id": kept["id"], "space": "prefs"})
            assert got["content"] == "the user likes leeks" and got["pinned"]
            hits = c.call("memory.search", {"query": "thought", "space": "prefs"})["hits"]
            assert hits == []  # unpinned short-term memory ended with the daemon
            mine = c.call("memory.get", {"id": session["id"], "space": session["space"]})
            assert mine["content"] == "pinned in my session"
    finally:
        assert again.stop() == 0


def test_the_daemons_state_is_private_and_a_truncated_store_is_reported() -> None:
    """Outside systemd (whose UMask= would hide it): files 0600, directories 0700; a store
    truncated to nothing is moved aside and reported, and keeps its administrator's quota."""
    directory = Path(tempfile.mkdtemp(prefix="aiosd-private-"))
    config = write_config(directory, slots=1)
    state = directory / "state"
    storage = state / "storage"
    d = Daemon(directory, config)
    try:
        d.wait_ready()
        with Client(d.socket_path) as c:
            c.call("storage.put", {"collection": "c", "key": "k", "value": "v"})
            c.call("storage.set_quota", {"user": 0, "quota_bytes": 123456})
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in storage.iterdir()}
        assert modes == dict.fromkeys(
            ["0.sqlite", "0.sqlite-wal", "0.sqlite-shm", "ledger.sqlite"], 0o600
        )
        assert stat.S_IMODE(storage.stat().st_mode) == 0o700
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        # The daemon's umask is the unit's UMask=, 0077; the socket's directory, which it
        # creates, is still 0755, so that every user can reach the socket.
        status = Path(f"/proc/{d.proc.pid}/status").read_text()
        assert "\nUmask:\t0077\n" in status
        assert stat.S_IMODE(d.socket_path.parent.stat().st_mode) == 0o755
    finally:
        assert d.stop() == 0
    (storage / "0.sqlite").write_bytes(b"")

    again = Daemon(directory, config)
    try:
        again.wait_ready()
        with Client(again.socket_path) as c:
            with pytest.raises(AiosError, match="empty .* moved aside to 0.sqlite.corrupt-"):
                c.call("storage.usage", {})
            use = c.call("storage.usage", {})
            assert (use["used_entries"], use["quota_bytes"]) == (0, 123456)
        assert "empty" in again.log() and list(storage.glob("0.sqlite.corrupt-*"))
    finally:
        assert again.stop() == 0

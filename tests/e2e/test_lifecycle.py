"""systemd lifecycle of the real daemon: socket activation, READY, WATCHDOG, STOPPING, exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import (
    REPO,
    Daemon,
    NotifySocket,
    RawClient,
    queue_of,
    story_request,
    wait_until,
    write_config,
)

WATCHDOG_USEC = 400_000
STOP_TIMEOUT = 30.0  # TimeoutStopSec= of aiosd.service
PINGS = 8  # watchdog pings whose spacing is checked


def _socket_dir() -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="aiosd-act-"))
    path.chmod(0o755)
    return path


@pytest.mark.e2e
def test_socket_activated_daemon_notifies_ready_watchdog_and_stops_cleanly() -> None:
    directory = _socket_dir()
    config = write_config(directory)
    socket_path = directory / "activated.sock"
    probe: list[object] = []

    def on_message(field: str) -> None:
        # At the instant READY=1 arrives the socket must already answer a real call.
        if field == "READY=1" and not probe:
            try:
                client = RawClient(socket_path, timeout=5)
                probe.append(client.call("system.status", req_id="probe"))
                client.close()
            except Exception as exc:  # recorded, asserted below
                probe.append(exc)

    notify = NotifySocket(directory / "notify.sock", on_message)
    log = (directory / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [
            "systemd-socket-activate",
            "--listen",
            str(socket_path),
            "-E",
            f"NOTIFY_SOCKET={notify.path}",
            "-E",
            f"WATCHDOG_USEC={WATCHDOG_USEC}",
            "-E",
            f"PYTHONPATH={REPO}",
            sys.executable,
            "-m",
            "aiosd",
            "--config",
            str(config),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        wait_until(socket_path.exists, 10, "socket from systemd-socket-activate")
        # The first connection starts the daemon (systemd-socket-activate execs it on demand).
        first = RawClient(socket_path, timeout=60)
        reply = first.call("system.status", req_id=1)
        assert reply["result"]["state"] == "running"
        assert reply["result"]["pid"] == proc.pid  # exec'd in place: LISTEN_PID matched
        notify.wait_for("READY=1", timeout=60)
        assert len(probe) == 1 and isinstance(probe[0], dict), probe
        assert probe[0]["result"]["version"]
        assert any(f.startswith("STATUS=") for f in notify.fields())

        # Eight pings at WATCHDOG_USEC / 2 take 1.6 s; the timeout only guards a silent loop.
        notify.wait_for("WATCHDOG=1", timeout=30, count=PINGS)
        pings = notify.times("WATCHDOG=1")[:PINGS]
        gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
        assert max(gaps) < WATCHDOG_USEC / 1e6, f"a watchdog gap of {max(gaps):.3f}s"
        first.close()

        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=STOP_TIMEOUT)
        assert code == 0, (directory / "daemon.log").read_text()
        assert time.monotonic() - t0 < STOP_TIMEOUT
        notify.wait_for("STOPPING=1", timeout=1)
        # Socket activation: the socket belongs to the activator, the daemon leaves it alone.
        assert socket_path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        log.close()


@pytest.mark.e2e
def test_sighup_reloads_configuration(tmp_path: Path) -> None:
    config = write_config(tmp_path)  # two slots, the default queue_size (64)
    daemon = Daemon(tmp_path, config)
    clients: list[RawClient] = []
    try:
        daemon.wait_ready()
        client = RawClient(daemon.socket_path)
        clients.append(client)
        assert client.call("system.status")["result"]["state"] == "running"
        config.write_text(config.read_text() + "\n[scheduler]\nqueue_size = 3\nbogus_key = 1\n")
        daemon.proc.send_signal(signal.SIGHUP)
        reloading = daemon.notify.wait_for("RELOADING=1", timeout=10)
        assert daemon.wait_ready(timeout=10, count=2) >= reloading
        assert any(f.startswith("MONOTONIC_USEC=") for f in daemon.notify.fields())
        assert "unknown key 'scheduler.bogus_key' ignored" in daemon.log()
        assert client.call("system.status")["result"]["state"] == "running"

        # The new queue_size took effect: with both slots busy, three requests wait and a
        # fourth is turned away (at the old limit of 64 it would wait too).
        for req_id in (1, 2):
            running = RawClient(daemon.socket_path)
            clients.append(running)
            running.send(story_request(req_id, 1500))
            assert running.recv()["method"] == "stream"  # it holds a slot now
        # One connection, one write: four requests arrive together, whatever order they reach
        # the queue in, the fourth to get there finds it full.
        waiters = RawClient(daemon.socket_path, timeout=15)
        clients.append(waiters)
        waiters.send_raw(
            b"".join(json.dumps(story_request(i, 8)).encode() + b"\n" for i in range(3, 7))
        )
        try:
            busy = waiters.recv()
        except TimeoutError:
            raise AssertionError(
                f"all four requests wait: queue_size = 3 did not take effect {queue_of(client)}"
            ) from None
        assert busy["error"]["code"] == -32002, busy  # Busy
        assert busy["error"]["data"] == {"queue_length": 3, "limit": 3, "scope": "model"}
        queue = queue_of(client)
        assert len(queue["running"]) == 2 and len(queue["waiting"]) == 3, queue
        for c in clients[1:]:
            c.close()  # their requests are cancelled: the daemon stops without draining them
        del clients[1:]

        # A broken file on reload is refused and the daemon keeps running as it was.
        config.write_text(config.read_text() + "\n[socket]\nmax_connections = -1\n")
        daemon.proc.send_signal(signal.SIGHUP)
        # READY=1 follows the refusal, which is logged before it.
        daemon.wait_ready(timeout=10, count=3)
        assert "reload refused" in daemon.log()
        assert "socket.max_connections" in daemon.log()
        assert client.call("system.status")["result"]["state"] == "running"
    finally:
        for c in clients:
            c.close()
        assert daemon.stop() == 0


@pytest.mark.e2e
def test_status_follows_connections_and_requests_as_they_change(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, write_config(tmp_path, slots=1))
    try:
        daemon.wait_ready()
        fields = daemon.notify.fields()
        ready = fields.index("READY=1")
        idle = "STATUS=1 model(s), 0 running, 0 waiting, 0 connection(s)"
        # Sent with READY=1 in one datagram; the self-check's own connection is gone by then.
        assert fields[ready + 1] == idle, fields
        client = RawClient(daemon.socket_path)
        # A connection is a kernel change event: STATUS= follows it, nothing polls for it.
        one = "STATUS=1 model(s), 0 running, 0 waiting, 1 connection(s)"
        daemon.notify.wait_for(one, 10)
        client.send(story_request(1, 400))
        daemon.notify.wait_for("STATUS=1 model(s), 1 running, 0 waiting, 1 connection(s)", 10)
        client.close()
        # The client went away: its request is cancelled, its connection closed.
        daemon.notify.wait_for(idle, 30, count=2)
        after = [f for f in daemon.notify.fields()[ready + 1 :] if f.startswith("STATUS=")]
        assert after[0] == idle and one in after, after
        repeats = [a for a, b in zip(after, after[1:], strict=False) if a == b]
        assert not repeats, f"a STATUS= repeated: {after}"
    finally:
        assert daemon.stop() == 0, daemon.log()

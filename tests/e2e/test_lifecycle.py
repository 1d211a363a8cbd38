"""systemd lifecycle of the real daemon: socket activation, READY, WATCHDOG, STOPPING, exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import REPO, NotifySocket, RawClient, write_config

WATCHDOG_USEC = 400_000
STOP_TIMEOUT = 30.0  # TimeoutStopSec= of aiosd.service


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
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)
        # The first connection starts the daemon (systemd-socket-activate execs it on demand).
        first = RawClient(socket_path, timeout=60)
        reply = first.call("system.status", req_id=1)
        assert reply["result"]["state"] == "running"
        assert reply["result"]["pid"] == proc.pid  # exec'd in place: LISTEN_PID matched
        notify.wait_for("READY=1", timeout=60)
        assert len(probe) == 1 and isinstance(probe[0], dict), probe
        assert probe[0]["result"]["version"]  # type: ignore[index]
        assert any(f.startswith("STATUS=") for f in notify.fields())

        time.sleep(2.5)
        pings = notify.times("WATCHDOG=1")
        assert len(pings) >= 8, f"only {len(pings)} WATCHDOG=1 in 2.5 s at {WATCHDOG_USEC} us"
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
    from tests.support import Daemon

    config = write_config(tmp_path)
    daemon = Daemon(tmp_path, config)
    try:
        daemon.wait_ready()
        client = RawClient(daemon.socket_path)
        assert client.call("system.status")["result"]["state"] == "running"
        config.write_text(config.read_text() + "\n[scheduler]\nqueue_size = 3\nbogus_key = 1\n")
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.notify.wait_for("RELOADING=1", timeout=10)
        deadline = time.monotonic() + 10
        while daemon.notify.fields().count("READY=1") < 2:
            assert time.monotonic() < deadline, daemon.notify.fields()
            time.sleep(0.02)
        assert any(f.startswith("MONOTONIC_USEC=") for f in daemon.notify.fields())
        assert "unknown key 'scheduler.bogus_key' ignored" in daemon.log()
        assert client.call("system.status")["result"]["state"] == "running"
        # A broken file on reload is refused and the daemon keeps running as it was.
        config.write_text(config.read_text() + "\n[socket]\nmax_connections = -1\n")
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload refused" not in daemon.log():
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        assert "socket.max_connections" in daemon.log()
        assert client.call("system.status")["result"]["state"] == "running"
        client.close()
    finally:
        assert daemon.stop() == 0

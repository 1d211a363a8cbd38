"""The D-Bus front-end's lifecycle: READY after the name, the bus going away and coming back."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from aiosd.sdk import Client
from aiosd.sdk.dbus import BusClient
from tests.support import (
    REPO,
    Daemon,
    PrivateBus,
    RawClient,
    queue_of,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.e2e


def _name_owned(bus: PrivateBus) -> bool:
    out = subprocess.run(
        [
            "gdbus",
            "call",
            "--address",
            bus.address,
            "--dest",
            "org.freedesktop.DBus",
            "--object-path",
            "/org/freedesktop/DBus",
            "--method",
            "org.freedesktop.DBus.NameHasOwner",
            "org.aiosd.Daemon1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.strip() == "(true,)"


def test_ready_only_after_the_name_is_owned_and_survives_the_bus_restarting() -> None:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-dbuslife-"))
    bus = PrivateBus(directory / "bus")
    bus.start()
    owned_at_ready: list[bool] = []
    d = Daemon(directory, write_config(directory, dbus_address=bus.address, slots=1))
    d.notify.on_message = lambda f: (
        owned_at_ready.append(_name_owned(bus)) if f == "READY=1" else None
    )
    try:
        d.wait_ready()
        # The notify reader runs on_message before it records READY=1: the answer is in.
        assert owned_at_ready == [True]
        with BusClient(bus.address) as c:
            assert c.call("system.status")["state"] == "running"

        bus.stop()  # the bus crashes
        d.wait_log("lost the connection", 10)
        with Client(d.socket_path) as c:  # the socket goes on serving meanwhile
            assert c.chat("hi", max_tokens=2)["usage"]["completion_tokens"] == 2
        assert d.proc.poll() is None

        bus.start()  # and comes back at the same address
        d.wait_log("reconnected", 30)
        with BusClient(bus.address) as c:
            assert c.call("system.status")["state"] == "running"
        with BusClient(bus.address) as c:
            notes = list(
                c.stream(
                    "llm.chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
                )
            )
            assert len(notes) >= 1 and c.last_result["usage"]["completion_tokens"] == 3
    finally:
        assert d.stop() == 0, d.log()
        bus.stop()


def test_start_without_the_bus_fails_clearly(tmp_path: Path) -> None:
    address = f"unix:path={tmp_path}/no-bus.sock"
    config = write_config(tmp_path, dbus_address=address)
    out = subprocess.run(
        [sys.executable, "-m", "aiosd", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 1
    assert address in out.stderr and "--no-dbus" in out.stderr
    assert "Traceback" not in out.stderr
    # and --no-dbus starts it anyway
    d = Daemon(tmp_path, config, extra_args=["--no-dbus"])
    try:
        d.wait_ready()
        assert "D-Bus front-end disabled" in d.log()
    finally:
        assert d.stop() == 0


def test_second_daemon_cannot_take_the_name(tmp_path: Path, private_bus: PrivateBus) -> None:
    first_dir = Path(tempfile.mkdtemp(prefix="aiosd-first-"))
    first = Daemon(first_dir, write_config(first_dir, dbus_address=private_bus.address, slots=1))
    try:
        first.wait_ready()
        config = write_config(tmp_path, dbus_address=private_bus.address, slots=1)
        out = subprocess.run(
            [sys.executable, "-m", "aiosd", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert out.returncode == 1
        assert "org.aiosd.Daemon1 is already owned" in out.stderr
        # The kernel and the socket were up when the bus refused the name: the failed start
        # unwinds them as a stop does, and the socket file does not outlive the daemon.
        assert "listening on" in out.stderr and "stopping" in out.stderr, out.stderr
        assert not (tmp_path / "run" / "aiosd.sock").exists()
        with Client(first.socket_path) as c:  # and the first daemon is untouched
            assert c.call("system.status")["state"] == "running"
    finally:
        assert first.stop() == 0


def test_clients_leaving_or_the_bus_dying_with_calls_in_flight() -> None:
    import threading

    directory = Path(tempfile.mkdtemp(prefix="aiosd-inflight-"))
    bus = PrivateBus(directory / "bus")
    bus.start()
    d = Daemon(directory, write_config(directory, dbus_address=bus.address, slots=1))
    try:
        d.wait_ready()
        # A client with two plain Chat calls in flight leaves: both are cancelled.
        script = (
            "import sys, threading\n"
            "from aiosd.sdk.dbus import BusClient\n"
            "def go():\n"
            "    c = BusClient(sys.argv[1]); c.connect()\n"
            "    c.call('llm.chat', {'messages': [{'role': 'user', 'content': 'story'}],"
            " 'max_tokens': 1500})\n"
            "for _ in range(2): threading.Thread(target=go).start()\n"
        )
        raw = RawClient(d.socket_path)
        proc = subprocess.Popen([sys.executable, "-c", script, bus.address], cwd=REPO)
        try:
            # One slot: one Chat holds it, the other waits; then the client dies.
            wait_until(
                lambda: (q := queue_of(raw)) and len(q["running"]) == 1 and len(q["waiting"]) == 1,
                30,
                "both Chat calls in flight",
            )
        finally:
            proc.kill()
            proc.wait(30)
        wait_until(
            lambda: (q := queue_of(raw)) and not q["running"] and not q["waiting"],
            30,
            "both calls of the vanished client cancelled",
        )
        # The bus dies while a Chat is in flight: the daemon still reconnects.
        client = BusClient(bus.address)
        client.connect()
        errors: list[BaseException] = []

        def long_call() -> None:
            try:
                client.call(
                    "llm.chat",
                    {"messages": [{"role": "user", "content": "story"}], "max_tokens": 1500},
                )
            except BaseException as exc:  # the bus goes away under it
                errors.append(exc)

        t = threading.Thread(target=long_call, daemon=True)
        t.start()
        wait_until(lambda: len(queue_of(raw)["running"]) == 1, 30, "the D-Bus Chat running")
        bus.stop()
        t.join(30)
        assert errors
        bus.start()
        d.wait_log("reconnected", 30)
        # The Chat whose client the bus took away is cancelled, and the bus serves again.
        wait_until(lambda: not queue_of(raw)["running"], 30, "the orphaned Chat cancelled")
        with BusClient(bus.address) as c:
            assert c.call("system.status")["running"] == 0
        raw.close()
        assert "Set changed size" not in d.log() and "Traceback" not in d.log()
    finally:
        assert d.stop() == 0, d.log()
        bus.stop()

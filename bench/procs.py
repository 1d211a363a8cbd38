"""Processes under test: started with a NOTIFY_SOCKET we own, always stopped.

Every server the benchmarks start (the daemon, the echo server, the idle baseline) signals
``READY=1`` on ``$NOTIFY_SOCKET``; :class:`NotifiedProcess` records when ``Popen`` returned and
when that datagram arrived, and stops the process with SIGTERM (SIGKILL after a timeout) when
its ``with`` block ends, whatever happened inside.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from bench.common import N_CTX, source_dir


class ProcessFailed(RuntimeError):
    """A process under test exited early or did not become ready."""


class NotifiedProcess:
    """A child process that reports READY=1 on a notify socket owned by the benchmark."""

    def __init__(self, argv: list[str], directory: Path, name: str) -> None:
        self.argv = argv
        self.directory = directory
        self.name = name
        self.log_path = directory / f"{name}.log"
        self.notify_path = directory / f"{name}.notify"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.ready = 0.0
        self.returncode: int | None = None
        self._notify: socket.socket | None = None
        self._drainer: threading.Thread | None = None
        self._closing = False

    @property
    def pid(self) -> int:
        """The child's pid."""
        assert self.proc is not None
        return self.proc.pid

    @property
    def start_to_ready(self) -> float:
        """Seconds from Popen to the arrival of READY=1."""
        return self.ready - self.started

    def __enter__(self) -> Self:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Bind the notify socket and start the child, logging stdout+stderr to a file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.notify_path.unlink(missing_ok=True)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self.notify_path))
        source = source_dir()
        env = {
            **os.environ,
            "NOTIFY_SOCKET": str(self.notify_path),
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(source), os.environ.get("PYTHONPATH")])
            ),
        }
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC"):
            env.pop(key, None)
        with self.log_path.open("ab") as log:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=source
            )

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until READY=1 arrives; fail with the log's tail if the child exits first."""
        assert self.proc is not None and self._notify is not None
        self._notify.settimeout(0.02)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self._notify.recv(65536)
            except TimeoutError:
                if self.proc.poll() is not None:
                    raise ProcessFailed(
                        f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                    ) from None
                continue
            now = time.monotonic()
            if "READY=1" in data.decode(errors="replace").splitlines():
                self.ready = now
                # Keep reading: an unread notify socket fills up (10 datagrams) and then
                # blocks the child's next sd_notify (STATUS= updates), as systemd never would.
                self._drainer = threading.Thread(target=self._drain, daemon=True)
                self._drainer.start()
                return
        raise ProcessFailed(f"{self.name} not ready within {timeout}s:\n{self.log_tail()}")

    def _drain(self) -> None:
        sock = self._notify
        assert sock is not None
        while not self._closing:
            try:
                sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the child wrote."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it does not stop; close the notify socket."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                print(f"warning: {self.name} ignored SIGTERM for {timeout}s; killed", flush=True)
        if self.proc is not None:
            self.returncode = self.proc.returncode
            if self.returncode != 0:
                print(f"warning: {self.name} exited with status {self.returncode}", flush=True)
        self._closing = True
        if self._drainer is not None:
            self._drainer.join()
        if self._notify is not None:
            self._notify.close()
            self._notify = None
            self.notify_path.unlink(missing_ok=True)
        return self.returncode


def write_daemon_config(
    directory: Path,
    *,
    slots: int | None = None,
    threads: int | None = None,
    dbus: str | None = None,
) -> Path:
    """A config keeping every daemon path in ``directory``; without slots, the default model.

    The D-Bus front-end is enabled on bus address ``dbus`` when given, else disabled.
    """
    directory.mkdir(parents=True, exist_ok=True)
    model = ""
    if slots is not None:
        model = f"""
[llm.models.smollm2]
backend = "llamacpp"
slots = {slots}
threads = {threads or 0}
n_ctx = {N_CTX}
max_tokens = 256
"""
    cfg = directory / "aiosd.toml"
    cfg.write_text(
        f"""
[daemon]
state_directory = "{directory / "state"}"
runtime_directory = "{directory / "run"}"
log_level = "info"
log_target = "stderr"

[access]
open_to_all = true

[dbus]
enabled = {"true" if dbus else "false"}
bus = "{dbus or "system"}"

[shutdown]
drain_timeout = 5.0
close_timeout = 3.0
{model}"""
    )
    return cfg


class DaemonProcess(NotifiedProcess):
    """``python -m aiosd --config FILE``; its stderr (logs and audit lines) goes to a file."""

    def __init__(
        self,
        directory: Path,
        *,
        slots: int | None = None,
        threads: int | None = None,
        dbus: str | None = None,
    ) -> None:
        config = write_daemon_config(directory, slots=slots, threads=threads, dbus=dbus)
        super().__init__(
            [sys.executable, "-m", "aiosd", "--config", str(config)], directory, "aiosd"
        )
        self.socket_path = directory / "run" / "aiosd.sock"

    def audit_lines(self) -> int:
        """How many audit lines the daemon has logged so far."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        return sum(1 for line in text.splitlines() if " aiosd.audit: " in line)

"""aiosd lifecycle: config → logging → Kernel → front-ends → READY=1; staged stop; reload.

Exit codes: 0 clean stop; 1 failure while running or starting; 2 usage error;
78 (EX_CONFIG) the configuration is invalid (``aiosd.service`` does not restart on it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from aiosd import __version__, sd
from aiosd.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    DaemonConfig,
    LoadedConfig,
    load_config,
)
from aiosd.errors import AiosError
from aiosd.managers import audit
from aiosd.paths import DEFAULT_SOCKET

if TYPE_CHECKING:
    from aiosd.api.socket.server import SocketServer

log = logging.getLogger("aiosd")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The daemon's command line (see aiosd(8))."""
    ap = argparse.ArgumentParser(
        prog="aiosd",
        description="aiosd — LLM agent operating system daemon. Runs in the foreground; "
        "systemd starts it as aiosd.service.",
        epilog="Exit status: 0 stopped cleanly; 1 failed; 2 usage error; 78 invalid configuration.",
    )
    ap.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"main configuration file (default {DEFAULT_CONFIG_PATH}; drop-ins in PATH.d/)",
    )
    ap.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, print warnings and the effective file list, and exit",
    )
    ap.add_argument("--socket", type=Path, metavar="PATH", help="bind this socket path instead")
    ap.add_argument(
        "--no-socket", action="store_true", help="run without the Unix-socket front-end"
    )
    ap.add_argument("--no-dbus", action="store_true", help="run without the D-Bus front-end")
    ap.add_argument(
        "--log-level",
        choices=list(get_args(DaemonConfig.model_fields["log_level"].annotation)),
        help="override daemon.log_level",
    )
    ap.add_argument("--version", action="version", version=f"aiosd {__version__}")
    return ap.parse_args(argv)


def load(args: argparse.Namespace) -> LoadedConfig:
    """Load the configuration the command line points at."""
    path = args.config or DEFAULT_CONFIG_PATH
    return load_config(path, required=args.config is not None)


def setup_logging(config: Config, override: str | None) -> None:
    """journald with structured fields when it runs, else stderr."""
    level = getattr(logging, (override or config.daemon.log_level).upper())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    target = config.daemon.log_target
    use_journal = sd.journal_available() and (
        target == "journal" or (target == "auto" and sd.stderr_is_journal())
    )
    handler: logging.Handler
    if use_journal:
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER="aiosd")
        handler.setFormatter(audit.OneLineFormatter("%(message)s"))
        audit.to_journal()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            audit.OneLineFormatter("aiosd[%(process)d]: %(levelname)s %(name)s: %(message)s")
        )
        audit.to_stream()
    root.addHandler(handler)
    root.setLevel(level)


class Daemon:
    """One run of the daemon, from start to staged stop."""

    #: Shortest time between two STATUS= updates: a busy queue changes many times a second.
    STATUS_INTERVAL = 1.0

    def __init__(self, args: argparse.Namespace, loaded: LoadedConfig) -> None:
        from aiosd.kernel.kernel import Kernel

        self.args = args
        self.kernel = Kernel(loaded.config)
        self.socket_server: SocketServer | None = None
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._status_sent = ""
        self._status_at = 0.0
        self._status_timer: asyncio.TimerHandle | None = None

    @property
    def config(self) -> Config:
        """The running configuration (the kernel's: a reload replaces it there)."""
        return self.kernel.config

    async def run(self) -> int:
        """Start, notify READY, serve until SIGTERM/SIGINT, then stop in stages.

        Every part pushes its stop stage as soon as it exists, so a start that fails half-way
        unwinds exactly what was started, the way a normal stop does: first stop accepting
        (front-ends), then drain and close the kernel, then close the front-ends.
        """
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        sd.notify("STATUS=loading models")
        async with contextlib.AsyncExitStack() as stack:
            closing = await stack.enter_async_context(contextlib.AsyncExitStack())
            draining = await stack.enter_async_context(contextlib.AsyncExitStack())
            accepting = await stack.enter_async_context(contextlib.AsyncExitStack())
            stack.push_async_callback(self._begin_stop)
            draining.push_async_callback(self._stop_kernel)
            # A SIGTERM while models load or the front-ends start ends the start at once:
            # the cancelled start unwinds through the same stack as a stop.
            starting = asyncio.ensure_future(self._start(accepting, closing))
            stopped = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("stop requested while starting")
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                return EXIT_OK
            starting.result()  # a failed start raises here, after the stack has unwound
            self.kernel.listeners.append(self._status_changed)
            stack.callback(self.kernel.listeners.remove, self._status_changed)
            # Reloads only between READY=1 and the stop: never over a start or a stop.
            loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload()))
            stack.callback(loop.remove_signal_handler, signal.SIGHUP)
            self._status_sent = self.kernel.status_line()
            sd.notify("READY=1", f"STATUS={self._status_sent}")
            self._announce()
            interval = sd.watchdog_interval()
            if interval:
                self._spawn(self._watchdog(interval))
            await stopped
        log.info("stopped")
        return EXIT_OK

    async def _start(
        self, accepting: contextlib.AsyncExitStack, closing: contextlib.AsyncExitStack
    ) -> None:
        """Load the models, then start the front-ends (each pushes its own stop stages)."""
        await self.kernel.start()
        await self._start_socket(accepting, closing)
        await self._start_dbus(accepting, closing)

    async def _start_socket(
        self, accepting: contextlib.AsyncExitStack, closing: contextlib.AsyncExitStack
    ) -> None:
        if self.args.no_socket or not self.config.socket.enabled:
            log.info("socket front-end disabled")
            return
        from aiosd.api.socket.server import SocketServer

        path = self.args.socket or self.config.socket_path()
        server = SocketServer(self.kernel, self.config.socket, path)
        self.socket_server = server
        closing.push_async_callback(
            self._stage, server.close, "closing connections", server.peers, "close_timeout"
        )
        await server.start(None if self.args.socket else sd.listen_socket())
        accepting.push_async_callback(
            self._stage,
            server.stop_accepting,
            "closing the listening socket",
            server.peers,
            "stop_accepting_timeout",
        )
        await server.self_check()

    async def _start_dbus(
        self, accepting: contextlib.AsyncExitStack, closing: contextlib.AsyncExitStack
    ) -> None:
        if self.args.no_dbus or not self.config.dbus.enabled:
            log.info("D-Bus front-end disabled")
            return
        from aiosd.api.dbus.service import DBusFrontend

        frontend = DBusFrontend(self.kernel, self.config.dbus, asyncio.get_running_loop())
        await frontend.start()  # returns once the name is owned: READY=1 may follow
        closing.push_async_callback(
            self._stage, frontend.close, "closing D-Bus", frontend.pending, "close_timeout"
        )
        accepting.push_async_callback(
            self._stage,
            frontend.stop_accepting,
            "releasing the D-Bus name",
            frontend.pending,
            "stop_accepting_timeout",
        )

    async def _begin_stop(self) -> None:
        sd.notify("STOPPING=1", "STATUS=stopping")
        log.info("stopping")
        if self._status_timer is not None:
            self._status_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    async def _stop_kernel(self) -> None:
        cfg = self.config.shutdown
        await self.kernel.stop(cfg.drain_timeout, cfg.close_timeout)

    async def _stage(
        self,
        step: Callable[[], Coroutine[Any, Any, None]],
        what: str,
        running: Callable[[], list[str]],
        timeout_key: str,
    ) -> None:
        """One stop stage, bounded by its [shutdown] timeout; on time-out, say what is left."""
        timeout: float = getattr(self.config.shutdown, timeout_key)
        try:
            await asyncio.wait_for(step(), timeout)
        except TimeoutError:
            left = running()
            log.warning(
                "stop: %s took longer than %.1fs (shutdown.%s); still there: %s",
                what,
                timeout,
                timeout_key,
                ", ".join(left) if left else "nothing known",
            )

    def _announce(self) -> None:
        if self.socket_server is not None:
            path = self.socket_server.path
            default = self.config.socket_path() == path == DEFAULT_SOCKET
            hint = "aiosctl" if default else f"aiosctl --socket {path}"
            log.info('ready: socket %s — try: %s ask "Name three Linux init systems"', path, hint)
        else:
            log.info("ready (no front-end)")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watchdog(self, interval: float) -> None:
        # Pinged from the event loop itself: a blocked loop misses pings and systemd notices.
        while True:
            sd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _status_changed(self) -> None:
        """The kernel changed: send STATUS= soon, at most once per STATUS_INTERVAL."""
        if self._status_timer is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._status_at + self.STATUS_INTERVAL - loop.time())
        self._status_timer = loop.call_later(delay, self._send_status)

    def _send_status(self) -> None:
        self._status_timer = None
        self._status_at = asyncio.get_running_loop().time()
        line = self.kernel.status_line()
        if line != self._status_sent and self.kernel.state != "stopping":
            sd.notify(f"STATUS={line}")
            self._status_sent = line

    async def reload(self) -> None:
        """SIGHUP: re-read the configuration and apply what can change live."""
        sd.notify(*sd.reloading_fields())
        try:
            loaded = load(self.args)
        except ConfigError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)
        else:
            for warning in loaded.warnings:
                log.warning("%s", warning)
            setup_logging(loaded.config, self.args.log_level)
            try:
                needs_restart = await self.kernel.reload(loaded.config)
            except AiosError as exc:
                log.error("reload refused, keeping the running configuration: %s", exc)
                return
            if needs_restart:
                log.warning(
                    "reloaded; changes to [%s] take effect after a restart",
                    "], [".join(needs_restart),
                )
            else:
                log.info("configuration reloaded")
        finally:
            # systemd waits for READY=1 after RELOADING=1, whatever became of the reload.
            self._status_sent = self.kernel.status_line()
            sd.notify("READY=1", f"STATUS={self._status_sent}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aiosd`` command."""
    args = parse_args(argv)
    try:
        loaded = load(args)
    except ConfigError as exc:
        print(f"aiosd: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        for warning in loaded.warnings:
            print(f"aiosd: warning: {warning}", file=sys.stderr)
        files = ", ".join(loaded.files) or "none (built-in defaults)"
        print(f"configuration OK; files: {files}")
        return EXIT_OK
    # What the daemon creates is its own unless it says otherwise (the socket and its
    # directory do), as UMask=0077 in aiosd.service makes it under systemd.
    os.umask(0o077)
    setup_logging(loaded.config, args.log_level)
    for warning in loaded.warnings:
        log.warning("%s", warning)
    try:
        return asyncio.run(Daemon(args, loaded).run())
    except (AiosError, OSError) as exc:  # str() of an AiosError is its message
        log.error("cannot start: %s", exc)
        sd.notify(f"STATUS=failed: {exc}")
        return EXIT_FAILURE
    finally:
        audit.stop()

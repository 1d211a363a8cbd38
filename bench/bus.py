"""A private, permissive dbus-daemon, so the daemon's default D-Bus front-end can be measured
on a machine without a system bus."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>{address}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""


class PrivateBus:
    """``dbus-daemon --nofork`` on a socket in ``directory``; killed when the block ends."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.socket = directory / "bus.sock"
        self.address = f"unix:path={self.socket}"
        self.config = directory / "bus.conf"
        self.config.write_text(CONFIG.format(address=self.address))
        self.log = directory / "bus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        argv = ["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={self.config}"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*argv, "--print-address"], stdout=subprocess.PIPE, stderr=log
            )
        assert self.proc.stdout is not None
        printed = self.proc.stdout.readline().decode().strip()  # printed once it listens
        if not printed.startswith(self.address):
            self.__exit__(None, None, None)
            raise RuntimeError(f"dbus-daemon did not start: {printed!r}")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.socket.unlink(missing_ok=True)

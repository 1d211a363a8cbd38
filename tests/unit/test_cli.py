"""aiosctl without a daemon: clear messages and the documented exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from aiosd.cli.main import EXIT_UNAVAILABLE, EXIT_USAGE
from tests.support import REPO


def _aiosctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiosd.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_unreachable_daemon_names_the_socket_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "nothing.sock"
    out = _aiosctl("--socket", str(path), "status")
    assert out.returncode == EXIT_UNAVAILABLE == 69
    assert str(path) in out.stderr
    assert "systemctl start aiosd" in out.stderr
    assert "Traceback" not in out.stderr


def test_socket_option_after_the_command_and_env_default(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    out = _aiosctl("models", "--socket", str(path))
    assert out.returncode == EXIT_UNAVAILABLE and str(path) in out.stderr


def test_bad_schema_is_a_usage_error(tmp_path: Path) -> None:
    # Found before connecting: the (absent) daemon plays no part in a usage error.
    out = _aiosctl("--socket", str(tmp_path / "x.sock"), "ask", "--schema", "{not json", "hi")
    assert out.returncode == EXIT_USAGE
    assert "--schema: not valid JSON" in out.stderr
    out = _aiosctl("--socket", str(tmp_path / "x.sock"), "ask", "--schema", "@/nonexistent", "hi")
    assert out.returncode == EXIT_USAGE and "cannot read /nonexistent" in out.stderr
    out = _aiosctl("--socket", str(tmp_path / "x.sock"), "call", "system.status", "[1]")
    assert out.returncode == EXIT_USAGE and "must be a JSON object" in out.stderr


def test_help_lists_every_syscall_and_exit_code() -> None:
    from aiosd.kernel.syscalls import SYSCALLS

    out = _aiosctl("--help")
    assert out.returncode == 0
    for name in SYSCALLS:
        assert name in out.stdout
    for code in ("65", "69", "75", "77"):
        assert f"  {code} " in out.stdout

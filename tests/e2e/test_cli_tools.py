"""``aiosctl tool …`` and ``aiosctl ask --tools`` end to end, run as a real user (alice, ``in``).

aiosctl runs as her (uid, gid and groups), so the daemon knows her from the kernel; with no
terminal, a confirmation request is answered by ``--yes``/``--no`` or waits for an answer
from elsewhere (``aiosctl tool confirm``), which the test gives as her too.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiosd.cli.main import EXIT_FAILURE, EXIT_USAGE
from tests.conftest import UnixUser
from tests.support import REPO, Daemon, owned, user_home, wait_until, write_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    directory = Path(tempfile.mkdtemp(prefix="aiosd-cli-tools-"))
    directory.chmod(0o755)
    d = Daemon(
        directory, write_config(directory, slots=1, extra="[tools]\nconfirm_timeout = 20.0\n")
    )
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0, d.log()


class Ctl:
    """The real aiosctl, as alice, against the module's daemon."""

    def __init__(self, daemon: Daemon, user: UnixUser) -> None:
        self.socket = str(daemon.socket_path)
        self.user = user

    def spawn(self, argv: list[str], **io: Any) -> subprocess.Popen[str]:
        """``argv`` as alice (uid, gid, groups) with a clean environment, in the repository."""
        env = {"PATH": "/usr/bin:/bin", "HOME": str(user_home(self.user)), "LANG": "C.UTF-8"}
        return subprocess.Popen(
            argv,
            user=self.user.uid,
            group=self.user.gid,
            extra_groups=self.user.groups,
            cwd=REPO,
            env=env,
            text=True,
            **io,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return self.spawn(
            [sys.executable, "-m", "aiosd.cli", "--socket", self.socket, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # no controlling terminal: nothing to ask on
        )

    def __call__(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = self.popen(*args)
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.fixture
def ctl(daemon: Daemon, unix_users: dict[str, UnixUser]) -> Ctl:
    return Ctl(daemon, unix_users["in"])


@pytest.fixture
def folder(unix_users: dict[str, UnixUser]) -> Iterator[Path]:
    user = unix_users["in"]
    d = owned(user, user_home(user) / f"cli-{secrets.token_hex(4)}", mode=0o700)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_list_describe_and_call(ctl: Ctl, folder: Path, unix_users: dict[str, UnixUser]) -> None:
    owned(unix_users["in"], folder / "a.txt", "alpha\n")
    listed = ctl("tool", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()}
    assert rows["fs.read"] == "read" and rows["fs.write"] == "asks"
    described = json.loads(ctl("tool", "describe", "fs.read").stdout)
    assert described["parameters"]["required"] == ["path"]
    read = ctl("tool", "call", "fs.read", f"path={folder}/a.txt", "max_bytes=100")
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout)["text"] == "alpha\n"
    denied = ctl("tool", "call", "fs.read", "path=/etc/shadow")
    assert denied.returncode == EXIT_FAILURE
    assert "fs.read failed: /etc/shadow: Permission denied (EACCES)" in denied.stderr
    bad = ctl("tool", "call", "fs.read", "path")
    assert bad.returncode == EXIT_USAGE and "write KEY=VALUE" in bad.stderr
    unknown = ctl("tool", "call", "fs.nope")
    assert unknown.returncode != 0 and "no tool 'fs.nope'" in unknown.stderr


def test_a_confirmation_with_no_terminal_waits_for_an_answer_from_elsewhere(
    ctl: Ctl, folder: Path
) -> None:
    target = folder / "b.txt"
    p = ctl.popen("tool", "call", "fs.write", f"path={target}", "content=from the cli")
    errors: list[str] = []
    t = threading.Thread(target=lambda: errors.append(p.stderr.read() if p.stderr else ""))
    t.start()
    pending: list[dict[str, str]] = []

    def waiting() -> bool:
        out = ctl("--json", "tool", "pending")
        pending[:] = json.loads(out.stdout) if out.returncode == 0 else []
        return bool(pending)

    wait_until(waiting, 20, "the request in tool pending")
    assert pending[0]["tool"] == "fs.write" and not target.exists()
    answered = ctl("tool", "confirm", pending[0]["id"], "yes")
    assert answered.returncode == 0 and answered.stdout == "fs.write: allowed\n"
    assert p.wait(30) == 0
    t.join(10)
    assert f"aiosctl tool confirm {pending[0]['id']} yes|no" in errors[0]
    assert target.read_text() == "from the cli"


def test_yes_and_no_answer_it_at_once(ctl: Ctl, folder: Path) -> None:
    no = ctl("tool", "call", "--no", "fs.write", f"path={folder}/c.txt", "content=x")
    assert no.returncode != 0 and "you declined" in no.stderr
    assert not (folder / "c.txt").exists()
    yes = ctl("tool", "call", "-y", "fs.write", f"path={folder}/c.txt", "content=x")
    assert yes.returncode == 0, yes.stderr
    assert json.loads(yes.stdout)["bytes_written"] == 1


def test_ask_with_tools_shows_each_step(ctl: Ctl) -> None:
    prompt = "How many CPUs does this machine have?"  # (greedy: this one makes a call)
    out = ctl("ask", "--tools", "system.info", "--max-tokens", "48", prompt)
    assert out.returncode == 0, out.stderr
    assert "aiosctl: system.info() -> ok" in out.stderr.splitlines()
    usage = ctl("ask", "--max-steps", "2", "hi")
    assert usage.returncode == EXIT_USAGE and "--max-steps goes with --tools" in usage.stderr
    assert os.cpu_count()  # (the answer's text is the model's: not checked)


def test_on_a_terminal_it_asks_y_n_with_the_whole_arguments(ctl: Ctl, folder: Path) -> None:
    """aiosctl on a terminal of its own (script(1) makes one), as alice: the prompt shows the
    tool and its arguments; "y" lets the call run, and a second call answered "n" does not."""
    import select

    def on_a_terminal(answer: str, target: Path) -> tuple[int, str]:
        cmd = " ".join(
            [sys.executable, "-m", "aiosd.cli", "--socket", ctl.socket, "tool", "call",
             "fs.write", f"path={target}", "content='typed at a terminal'"]
        )  # fmt: skip
        p = ctl_popen_script(ctl, cmd)
        assert p.stdin is not None and p.stdout is not None
        seen = b""
        while b"Allow? [y/N/s(ession)/a(lways)]" not in seen:
            ready, _, _ = select.select([p.stdout], [], [], 30)
            assert ready, f"no prompt: {seen!r}"
            chunk = os.read(p.stdout.fileno(), 4096)
            assert chunk, f"ended before the prompt: {seen!r}"
            seen += chunk
        p.stdin.write(answer + "\n")
        p.stdin.flush()
        out, _ = p.communicate(timeout=60)
        return p.returncode, (seen + out.encode()).decode(errors="replace")

    code, shown = on_a_terminal("y", folder / "tty.txt")
    assert code == 0, shown
    assert "fs.write (destructive) wants to run with:" in shown
    assert '"content": "typed at a terminal"' in shown and str(folder / "tty.txt") in shown
    assert (folder / "tty.txt").read_text() == "typed at a terminal"
    code, shown = on_a_terminal("n", folder / "refused.txt")
    assert code != 0 and "you declined" in shown
    assert not (folder / "refused.txt").exists()


def ctl_popen_script(ctl: Ctl, command: str) -> subprocess.Popen[str]:
    """``command`` as alice inside script(1), which gives it a terminal of its own."""
    return ctl.spawn(
        ["/usr/bin/script", "-qec", command, "/dev/null"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )

"""The systemd agent backend against a real systemd (PID 1, cgroup v2, journald, system bus).

Skipped where systemd is not PID 1: ``scripts/test-systemd`` boots a VM that has it.  The
backend is driven directly (no daemon): an agent is a real unprivileged user's process in a
transient unit, checked with ``systemctl show`` and /proc.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from aiosd.config import AgentsConfig
from aiosd.errors import NotSupported
from aiosd.kernel.agents import Agent, Launch, Limits
from aiosd.osbridge.agents_systemd import SystemdBackend, unit_name
from aiosd.osbridge.executor import UnixAccount, user_environment

pytestmark = [
    pytest.mark.skipif(
        not os.path.isdir("/run/systemd/system"),
        reason="needs systemd as PID 1 (no /run/systemd/system): run scripts/test-systemd",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="starts units for another user: needs root"),
    # The VM is emulated (~30x slower): plain bookkeeping on the loop takes longer there.
    pytest.mark.loop_block_limit(1.0),
]

USER = "aiosd-sd-agent"


@pytest.fixture(scope="module")
def account() -> UnixAccount:
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
    return UnixAccount.of(pwd.getpwnam(USER).pw_uid)


async def sh(*argv: str) -> str:
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True)
    return done.stdout


async def show(unit: str, *props: str) -> dict[str, str]:
    out = await sh("systemctl", "show", unit, *(f"-p{p}" for p in props))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


async def until(what: str, check: Any, timeout: float = 30.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.2)


class Harness:
    """A backend, and the ends it reports."""

    def __init__(self, tmp: Path) -> None:
        self.backend = SystemdBackend(AgentsConfig(stop_timeout=5.0), tmp)
        self.exits: dict[str, asyncio.Future[tuple[int | None, int | None, str]]] = {}
        self.backend.on_exit = self._exited

    def _exited(self, aid: str, code: int | None, sig: int | None, reason: str) -> None:
        self.future(aid).set_result((code, sig, reason))

    def future(self, aid: str) -> asyncio.Future[tuple[int | None, int | None, str]]:
        if aid not in self.exits:
            self.exits[aid] = asyncio.get_running_loop().create_future()
        return self.exits[aid]

    async def launch(
        self, acct: UnixAccount, aid: str, argv: list[str], limits: Limits | None = None
    ) -> int:
        env = user_environment(acct, {}, {"AIOSD_AGENT_ID": aid})
        return await self.backend.launch(
            Launch(aid, acct, argv, acct.home, env, limits or Limits())
        )

    async def ended(self, aid: str, timeout: float = 60.0) -> tuple[int | None, int | None, str]:
        return await asyncio.wait_for(self.future(aid), timeout)


def agent(aid: str, acct: UnixAccount, argv: list[str]) -> Agent:
    return Agent(aid, acct.uid, acct.name, argv, acct.home, "", None, "normal", 0, None,
                 Limits(), "systemd")  # fmt: skip


def aid_for(test: str) -> str:
    return f"{test}{os.getpid() % 10000:04d}{int(time.time() * 1000) % 100000:05d}"


def test_agent_runs_limited_as_its_user(account: UnixAccount, tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        assert await h.backend.open([]) == set()
        aid = aid_for("a")
        unit = unit_name(aid)
        limits = Limits(memory_max=256 << 20, tasks_max=32, cpu_weight=50)
        t0 = time.monotonic()
        pid = await h.launch(account, aid, ["/bin/sh", "-c", "echo hello; sleep 300; true"], limits)
        print(f"launch took {time.monotonic() - t0:.2f} s")
        a = agent(aid, account, [])
        try:
            props = await show(unit, "User", "MemoryMax", "TasksMax", "CPUWeight", "Slice",
                               "ActiveState", "NoNewPrivileges", "KillMode", "MainPID")  # fmt: skip
            print(props)
            assert props["User"] == str(account.uid)
            assert props["MemoryMax"] == str(256 << 20)
            assert props["TasksMax"] == "32"
            assert props["CPUWeight"] == "50"
            assert props["Slice"] == "aiosd-agents.slice"
            assert props["ActiveState"] == "active"
            assert props["MainPID"] == str(pid)
            status = Path(f"/proc/{pid}/status").read_text()
            uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
            assert uid_line.split()[1:] == [str(account.uid)] * 4

            async def child() -> int | None:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                return int(kids[0]) if kids else None

            kid = await until("sh starts sleep", child)
            t0 = time.perf_counter()
            assert h.backend.identify(kid, account.uid) == aid
            print(f"identify took {(time.perf_counter() - t0) * 1e6:.0f} us")
            assert h.backend.identify(kid, account.uid + 1) is None
            assert h.backend.identify(os.getpid(), account.uid) is None
            u = h.backend.usage(a)
            print(u)
            assert u.tasks >= 2 and u.rss > 0

            await h.backend.suspend(a)
            assert (await show(unit, "FreezerState"))["FreezerState"] == "frozen"
            await h.backend.resume(a)
            assert (await show(unit, "FreezerState"))["FreezerState"] == "running"

            async def hello() -> bool:
                return any(line.text == "hello" for line in await h.backend.logs(a, 10))

            await until("hello in the journal", hello)
            lines = await h.backend.logs(a, 10)
            assert lines[-1].stream == "stdout" and lines[-1].time > 0

            h.backend.signal(a, signal.SIGTERM)
            assert await h.ended(aid) == (None, signal.SIGTERM, "")
            assert h.backend.identify(kid, account.uid) is None
            gone = await show(unit, "LoadState")
            assert gone.get("LoadState") == "not-found"  # collected at once
        finally:
            h.backend.signal(a, signal.SIGKILL)
            await h.backend.close()

    asyncio.run(main())


def test_follow_and_exit_status(account: UnixAccount, tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        await h.backend.open([])
        aid = aid_for("f")
        a = agent(aid, account, [])
        try:
            await h.launch(account, aid, ["sh", "-c", "sleep 3; echo one; echo two; exit 3"])
            got: list[str] = []
            async for item in h.backend.follow(a):
                assert not isinstance(item, int)
                got.append(item.text)
            assert got == ["one", "two"]
            assert await h.ended(aid) == (3, None, "")
        finally:
            await h.backend.close()

    asyncio.run(main())


def test_memory_hog_ends_with_the_oom_reason(account: UnixAccount, tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        await h.backend.open([])
        aid = aid_for("m")
        hog = "b = []\nwhile True:\n    b.append(bytearray(1 << 20))\n"
        try:
            t0 = time.monotonic()
            await h.launch(
                account, aid, ["/usr/bin/python3", "-c", hog], Limits(memory_max=64 << 20)
            )
            code, sig, reason = await h.ended(aid, 120)
            print(f"oom end after {time.monotonic() - t0:.1f} s: {code} {sig} {reason!r}")
            assert sig == signal.SIGKILL
            assert reason.startswith("memory limit: the kernel's OOM killer ended it")
        finally:
            await h.backend.close()

    asyncio.run(main())


def test_programs_that_cannot_start(account: UnixAccount, tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        await h.backend.open([])
        secret = tmp_path / "root-only.sh"
        secret.write_text("#!/bin/sh\necho no\n")
        secret.chmod(0o700)  # root may run it, the user may not
        try:
            failed = aid_for("x")
            with pytest.raises(NotSupported, match="cannot execute"):
                await h.launch(account, failed, [str(secret)])
            with pytest.raises(NotSupported, match="not found"):
                await h.launch(account, aid_for("y"), ["no-such-program-here"])
            # A failed unit is not left behind either.
            assert (await show(unit_name(failed), "LoadState"))["LoadState"] == "not-found"
        finally:
            await h.backend.close()

    asyncio.run(main())


def test_a_new_backend_takes_running_agents_over(account: UnixAccount, tmp_path: Path) -> None:
    async def main() -> None:
        first = Harness(tmp_path)
        await first.backend.open([])
        kept, orphan = aid_for("k"), aid_for("o")
        pid = await first.launch(account, kept, ["sleep", "300"])
        await first.launch(account, orphan, ["sleep", "300"])
        await first.backend.close()  # the daemon stops; its agents run on

        h = Harness(tmp_path)
        a = agent(kept, account, ["sleep", "300"])
        try:
            assert await h.backend.open([a]) == {kept}
            assert h.backend.identify(pid, account.uid) == kept

            async def orphan_gone() -> bool:
                state = await show(unit_name(orphan), "LoadState")
                return state.get("LoadState") == "not-found"

            await until("the unknown agent's unit is stopped", orphan_gone)
            h.backend.signal(a, signal.SIGKILL)
            assert await h.ended(kept) == (None, signal.SIGKILL, "")
        finally:
            h.backend.signal(a, signal.SIGKILL)
            await h.backend.close()

    asyncio.run(main())

"""The kernel driven directly, with no front-end: validate → authorize → route → audit."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from aiosd.config import Config
from aiosd.errors import InvalidParams, MethodNotFound, PermissionDenied
from aiosd.kernel import syscalls
from aiosd.kernel.kernel import Kernel
from aiosd.managers import audit
from aiosd.managers.access import Caller, Permission

ROOT = Caller(uid=0, gid=0, pid=1)
NOBODY = Caller(uid=65534, gid=65534, pid=2)


def _kernel() -> Kernel:
    k = Kernel(Config(), backends={})
    asyncio.run(k.start())
    return k


def test_kernel_serves_without_any_front_end() -> None:
    k = _kernel()
    status = asyncio.run(k.dispatch("system.status", {}, ROOT))
    assert status["state"] == "running" and status["caller_role"] == "admin"
    assert asyncio.run(k.dispatch("system.queue", None, ROOT)) == {"models": []}


def test_syscall_without_declared_permission_is_refused_even_for_root(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = syscalls.SYSCALLS["system.status"]
    undeclared = syscalls.Syscall(
        "test.undeclared",
        syscalls.NoParams,
        syscalls.StatusResult,
        None,
        spec.handler,
        "no permission declared",
    )
    monkeypatch.setitem(syscalls.SYSCALLS, "test.undeclared", undeclared)
    with pytest.raises(PermissionDenied, match="declares no permission"):
        asyncio.run(_kernel().dispatch("test.undeclared", {}, ROOT))


def test_admin_syscall_refuses_users(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = syscalls.SYSCALLS["system.status"]
    admin_only = syscalls.Syscall(
        "test.admin",
        syscalls.NoParams,
        syscalls.StatusResult,
        Permission.admin,
        spec.handler,
        "admin only",
    )
    monkeypatch.setitem(syscalls.SYSCALLS, "test.admin", admin_only)
    k = Kernel(Config.model_validate({"access": {"open_to_all": True}}), backends={})
    asyncio.run(k.start())
    user = Caller(uid=4242, gid=4242, pid=3)
    with pytest.raises(PermissionDenied, match="administrators"):
        asyncio.run(k.dispatch("test.admin", {}, user))
    assert asyncio.run(k.dispatch("test.admin", {}, ROOT))["caller_role"] == "admin"


def test_open_to_all_admits_everyone_as_user() -> None:
    k = Kernel(Config.model_validate({"access": {"open_to_all": True}}), backends={})
    asyncio.run(k.start())
    assert asyncio.run(k.dispatch("system.status", {}, NOBODY))["caller_role"] == "user"


@contextlib.contextmanager
def _audit_to(path: Path, level: int) -> Iterator[IO[str]]:
    """Send audit records to the file ``path`` with the audit logger at ``level``."""
    logger = logging.getLogger(audit.LOGGER)
    before = logger.level
    with path.open("w+") as sink:
        audit.to_stream(sink)
        logger.setLevel(level)
        try:
            yield sink
        finally:
            logger.setLevel(before)
            audit.to_stream(None)


def test_every_decision_is_audited(tmp_path: Path) -> None:
    k = _kernel()
    with _audit_to(tmp_path / "audit.log", logging.INFO) as sink:
        asyncio.run(k.dispatch("system.status", {}, ROOT))
        with pytest.raises(PermissionDenied):
            asyncio.run(k.dispatch("system.status", {}, NOBODY))
        with pytest.raises(InvalidParams):
            asyncio.run(k.dispatch("system.status", {"x": 1}, ROOT))
        with pytest.raises(MethodNotFound):
            asyncio.run(k.dispatch("no.such", {}, ROOT))
        sink.seek(0)
        lines = sink.read().splitlines()
    pattern = (
        r"aiosd\[\d+\]: INFO aiosd\.audit: (\S+) uid=(\d+) pid=\d+ aid=- verdict=(\w+)( \(.+\))?"
    )
    records = [re.fullmatch(pattern, line) for line in lines]
    assert all(records), lines
    verdicts = [(m.group(1), int(m.group(2)), m.group(3)) for m in records if m]
    assert verdicts == [
        ("system.status", 0, "ok"),
        ("system.status", 65534, "denied"),
        ("system.status", 0, "invalid"),
        ("no.such", 0, "unknown"),
    ]


def test_audit_follows_the_log_level(tmp_path: Path) -> None:
    k = _kernel()
    with _audit_to(tmp_path / "audit.log", logging.WARNING) as sink:
        asyncio.run(k.dispatch("system.status", {}, ROOT))
        assert sink.tell() == 0
    with _audit_to(tmp_path / "audit.log", logging.INFO) as sink:
        asyncio.run(k.dispatch("system.status", {}, ROOT))
        assert sink.tell() > 0


def test_unexpected_failure_is_an_internal_error_without_details(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aiosd.errors import InternalError

    async def boom(*_: object) -> syscalls.Result:
        raise RuntimeError("secret path /etc/shadow")

    spec = syscalls.SYSCALLS["system.status"]
    monkeypatch.setitem(
        syscalls.SYSCALLS,
        "system.status",
        syscalls.Syscall(
            "system.status", spec.params, spec.result, spec.permission, boom, spec.summary
        ),
    )
    with pytest.raises(InternalError) as exc:
        asyncio.run(_kernel().dispatch("system.status", {}, ROOT))
    assert "/etc/shadow" not in exc.value.message and "daemon log" in exc.value.message


def test_a_syscall_that_need_not_wait_completes_in_the_call() -> None:
    k = _kernel()
    # No event loop runs here: the answer cannot have needed a task.
    status = k.call("system.status", {}, ROOT)
    assert isinstance(status, dict) and status["caller_uid"] == 0
    assert k.call("system.queue", {}, ROOT) == {"models": []}


def test_a_syscall_that_waits_is_finished_by_awaiting(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = syscalls.SYSCALLS["system.status"]

    async def later(k: Kernel, p: object, c: Caller, emit: object) -> syscalls.Result:
        await asyncio.sleep(0)
        return k.system_status(c)

    monkeypatch.setitem(
        syscalls.SYSCALLS,
        "system.status",
        syscalls.Syscall(
            "system.status", spec.params, spec.result, spec.permission, later, spec.summary
        ),
    )
    k = _kernel()

    async def run() -> dict[str, object]:
        out = k.call("system.status", {}, ROOT)
        assert isinstance(out, asyncio.Task)
        # In flight from the moment it exists, not from its first step: a stop that begins
        # in between still drains or cancels it.
        assert out in k._inflight
        return await out

    assert asyncio.run(run())["caller_uid"] == 0
    assert not k._inflight


def test_a_request_cancelled_before_it_starts_leaves_nothing_unawaited(
    recwarn: pytest.WarningsRecorder,
) -> None:
    k = _kernel()

    async def run() -> None:
        task = k.call("storage.usage", {}, ROOT)
        assert isinstance(task, asyncio.Task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]

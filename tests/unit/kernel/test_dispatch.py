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
from aiosd.kernel.families.system import StatusResult
from aiosd.kernel.kernel import Kernel
from aiosd.kernel.syscall_base import Handler, NoParams, Result, Syscall
from aiosd.kernel.syscalls import SYSCALLS
from aiosd.managers import audit
from aiosd.managers.access import Caller, Permission

ROOT = Caller(uid=0, gid=0, pid=1)
NOBODY = Caller(uid=65534, gid=65534, pid=2)


def _kernel(config: Config | None = None, extra: dict[str, Syscall] | None = None) -> Kernel:
    """A started kernel with no models; ``extra`` syscalls are added to the real table."""
    table = {**SYSCALLS, **(extra or {})}
    k = Kernel(config or Config(), backends={}, syscalls=table, families={_Probe: _Probe()})
    asyncio.run(k.start())
    return k


class _Probe:
    """A syscall family of the tests' own."""

    def status(self, p: NoParams, c: Caller, emit: object) -> Result:
        return StatusResult(
            version="test",
            pid=0,
            uptime_s=0.0,
            state="running",
            models=[],
            default_model="",
            running=0,
            waiting=0,
            connections=0,
            caller_uid=c.uid,
            caller_role="admin" if c.uid == 0 else "user",
            caller_aid=c.aid,
            agents_backend="subprocess",
            agents_running=0,
        )

    async def later(self, p: NoParams, c: Caller, emit: object) -> Result:
        await asyncio.sleep(0)
        return self.status(p, c, emit)

    async def boom(self, p: NoParams, c: Caller, emit: object) -> Result:
        raise RuntimeError("secret path /etc/shadow")

    def other(self, p: NoParams, c: Caller, emit: object) -> Result:
        return _Other(status="fine")

    async def other_later(self, p: NoParams, c: Caller, emit: object) -> Result:
        return self.other(p, c, emit)


class _Other(Result):
    """Not the StatusResult the probes declare."""

    status: str


def _probe(name: str, handler: Handler, permission: Permission | None) -> dict[str, Syscall]:
    return {
        name: Syscall(
            name,
            NoParams,
            StatusResult,
            permission,
            handler,
            "a test syscall",
            _Probe,
        )
    }


def test_kernel_serves_without_any_front_end() -> None:
    k = _kernel()
    status = asyncio.run(_call(k, "system.status", {}, ROOT))
    assert status["state"] == "running" and status["caller_role"] == "admin"
    assert asyncio.run(_call(k, "system.queue", None, ROOT)) == {"models": []}


async def _call(k: Kernel, name: str, params: object, caller: Caller) -> dict[str, object]:
    return await k.dispatch(name, params, caller)


def test_syscall_without_declared_permission_is_refused_even_for_root() -> None:
    k = _kernel(extra=_probe("test.undeclared", _Probe.status, None))
    with pytest.raises(PermissionDenied, match="declares no permission"):
        asyncio.run(_call(k, "test.undeclared", {}, ROOT))


def test_admin_syscall_refuses_users() -> None:
    k = _kernel(
        Config.model_validate({"access": {"open_to_all": True}}),
        _probe("test.admin", _Probe.status, Permission.admin),
    )
    user = Caller(uid=4242, gid=4242, pid=3)
    with pytest.raises(PermissionDenied, match="administrators"):
        asyncio.run(_call(k, "test.admin", {}, user))
    assert asyncio.run(_call(k, "test.admin", {}, ROOT))["caller_role"] == "admin"


def test_injected_table_is_the_one_served() -> None:
    only_queue = {"system.queue": SYSCALLS["system.queue"]}
    k = Kernel(Config(), backends={}, syscalls=only_queue)
    asyncio.run(k.start())
    assert asyncio.run(_call(k, "system.queue", {}, ROOT)) == {"models": []}
    # Left out of the injected table: not served, though the real table has it.
    with pytest.raises(MethodNotFound):
        asyncio.run(_call(k, "system.status", {}, ROOT))


def test_a_family_without_an_instance_is_refused_at_construction() -> None:
    with pytest.raises(TypeError, match="_Probe"):
        Kernel(Config(), backends={}, syscalls=_probe("test.x", _Probe.status, Permission.user))


def test_open_to_all_admits_everyone_as_user() -> None:
    k = _kernel(Config.model_validate({"access": {"open_to_all": True}}))
    assert asyncio.run(_call(k, "system.status", {}, NOBODY))["caller_role"] == "user"


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
            audit.stop()


def test_every_decision_is_audited(tmp_path: Path) -> None:
    k = _kernel()
    with _audit_to(tmp_path / "audit.log", logging.INFO) as sink:
        asyncio.run(_call(k, "system.status", {}, ROOT))
        with pytest.raises(PermissionDenied):
            asyncio.run(_call(k, "system.status", {}, NOBODY))
        with pytest.raises(InvalidParams):
            asyncio.run(_call(k, "system.status", {"x": 1}, ROOT))
        with pytest.raises(MethodNotFound):
            asyncio.run(_call(k, "no.such", {}, ROOT))
        assert audit.flush()
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
        asyncio.run(_call(k, "system.status", {}, ROOT))
        assert audit.flush()
        assert sink.tell() == 0
    with _audit_to(tmp_path / "audit.log", logging.INFO) as sink:
        asyncio.run(_call(k, "system.status", {}, ROOT))
        assert audit.flush()
        assert sink.tell() > 0


def test_unexpected_failure_is_an_internal_error_without_details() -> None:
    from aiosd.errors import InternalError

    k = _kernel(extra=_probe("test.boom", _Probe.boom, Permission.user))
    with pytest.raises(InternalError) as exc:
        asyncio.run(_call(k, "test.boom", {}, ROOT))
    assert "/etc/shadow" not in exc.value.message and "daemon log" in exc.value.message


def test_a_syscall_that_need_not_wait_completes_in_the_call() -> None:
    k = _kernel()

    async def run() -> None:
        # Done when dispatch returns, with no await in between: no task was needed.
        status = k.dispatch("system.status", {}, ROOT)
        assert status.done() and not isinstance(status, asyncio.Task)
        assert status.result()["caller_uid"] == 0
        queue = k.dispatch("system.queue", {}, ROOT)
        assert queue.done() and queue.result() == {"models": []}
        assert not k._inflight

    asyncio.run(run())


def test_a_syscall_that_waits_is_finished_by_awaiting() -> None:
    k = _kernel(extra=_probe("test.later", _Probe.later, Permission.user))

    async def run() -> dict[str, object]:
        out = k.dispatch("test.later", {}, ROOT)
        assert isinstance(out, asyncio.Task) and not out.done()
        # In flight from the moment it exists, not from its first step: a stop that begins
        # in between still drains or cancels it.
        assert out in k._inflight
        assert k.running() == ["test.later (uid 0, pid 1)"]
        return await out

    assert asyncio.run(run())["caller_uid"] == 0
    assert not k._inflight


def test_a_request_cancelled_before_it_starts_leaves_nothing_unawaited(
    recwarn: pytest.WarningsRecorder,
) -> None:
    k = _kernel()

    async def run() -> None:
        task = k.dispatch("storage.usage", {}, ROOT)
        assert isinstance(task, asyncio.Task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


@pytest.mark.parametrize("handler", [_Probe.other, _Probe.other_later], ids=["sync", "async"])
def test_a_result_of_another_model_than_declared_is_an_internal_error(
    handler: Handler, caplog: pytest.LogCaptureFixture
) -> None:
    from aiosd.errors import InternalError

    k = _kernel(extra=_probe("test.other", handler, Permission.user))
    with caplog.at_level(logging.ERROR, logger="aiosd.kernel.dispatch"):
        with pytest.raises(InternalError, match="test.other failed inside the daemon"):
            asyncio.run(_call(k, "test.other", {}, ROOT))
    (record,) = caplog.records
    assert record.getMessage() == (
        "syscall test.other returned _Other, not its declared StatusResult"
    )

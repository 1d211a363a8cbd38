"""The kernel driven directly, with no front-end: validate → authorize → route → audit."""

from __future__ import annotations

import asyncio
import logging

import pytest

from aiosd.config import Config
from aiosd.errors import InvalidParams, MethodNotFound, PermissionDenied
from aiosd.kernel import syscalls
from aiosd.kernel.kernel import Kernel
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


def test_every_decision_is_audited(caplog: pytest.LogCaptureFixture) -> None:
    k = _kernel()
    caplog.set_level(logging.INFO, logger="aiosd.audit")
    asyncio.run(k.dispatch("system.status", {}, ROOT))
    with pytest.raises(PermissionDenied):
        asyncio.run(k.dispatch("system.status", {}, NOBODY))
    with pytest.raises(InvalidParams):
        asyncio.run(k.dispatch("system.status", {"x": 1}, ROOT))
    with pytest.raises(MethodNotFound):
        asyncio.run(k.dispatch("no.such", {}, ROOT))
    verdicts = [(r.AIOS_SYSCALL, r.AIOS_UID, r.AIOS_VERDICT) for r in caplog.records]  # type: ignore[attr-defined]
    assert verdicts == [
        ("system.status", 0, "ok"),
        ("system.status", 65534, "denied"),
        ("system.status", 0, "invalid"),
        ("no.such", 0, "unknown"),
    ]


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

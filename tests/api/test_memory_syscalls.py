"""The memory.* syscalls through the kernel (no front-end): one user's ids are simply not
found by another, bad input names the field, and a write beyond a bound names the bound."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aiosd.config import Config
from aiosd.errors import InvalidParams, NotFound, QuotaExceeded
from aiosd.kernel.families.memory import AddParams, MemorySyscalls
from aiosd.kernel.kernel import Kernel
from aiosd.managers.access import Caller

ALICE = Caller(uid=5001, gid=5001, pid=11, session="socket-1")
BOB = Caller(uid=5002, gid=5002, pid=12, session="socket-1")  # same session name, other uid


_started: list[Kernel] = []


@pytest.fixture(autouse=True)
def _stop_kernels() -> Iterator[None]:
    """Stop every kernel a test started: its stores and their threads close with it."""
    yield
    while _started:
        asyncio.run(_started.pop().stop(drain_timeout=1, close_timeout=5))


def _kernel(tmp_path: Path, **memory: Any) -> Kernel:
    k = Kernel(
        Config.model_validate(
            {
                "daemon": {"state_directory": str(tmp_path)},
                "access": {"open_to_all": True},
                "memory": memory,
            }
        ),
        backends={},
    )
    asyncio.run(k.start())
    _started.append(k)
    return k


def _call(k: Kernel, name: str, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
    async def call() -> dict[str, Any]:
        return await k.dispatch(name, params, caller)

    return asyncio.run(call())


def test_each_memory_syscall_works_for_its_owner(tmp_path: Path) -> None:
    k = _kernel(tmp_path)
    out = _call(k, "memory.add", {"content": "buy milk", "tags": ["todo"]}, ALICE)
    assert out["space"] == "socket-1" and out["id"] == 1 and out["evicted"] == []
    assert _call(k, "memory.get", {"id": 1}, ALICE)["content"] == "buy milk"
    hits = _call(k, "memory.search", {"query": "milk"}, ALICE)
    assert hits["space"] == "socket-1" and [h["id"] for h in hits["hits"]] == [1]
    out = _call(k, "memory.update", {"id": 1, "pinned": True}, ALICE)
    assert out["pinned"] is True and out["content"] == "buy milk"
    named = _call(k, "memory.add", {"content": "x", "space": "notes.v1"}, ALICE)
    assert named["space"] == "notes.v1" and named["id"] == 1
    assert _call(k, "memory.delete", {"id": 1, "space": "notes.v1"}, ALICE) == {
        "space": "notes.v1",
        "id": 1,
        "deleted": True,
    }
    assert _call(k, "memory.clear", {}, ALICE) == {"space": "socket-1", "removed": 0}
    assert _call(k, "memory.clear", {"keep_pinned": False}, ALICE)["removed"] == 1
    no_session = Caller(uid=5001, gid=5001, pid=13)
    assert _call(k, "memory.add", {"content": "y"}, no_session)["space"] == "default"


def test_another_users_ids_are_not_found(tmp_path: Path) -> None:
    k = _kernel(tmp_path)
    for space in (None, "shared-name"):
        where = {} if space is None else {"space": space}
        _call(k, "memory.add", {"content": "alice secret", **where}, ALICE)
        _call(k, "memory.add", {"content": "alice evicted secret", **where}, ALICE)
    assert k.memory is not None
    asyncio.run(k.memory.evict(ALICE.uid, "socket-1", [2]))
    asyncio.run(k.memory.evict(ALICE.uid, "shared-name", [2]))

    for where in ({}, {"space": "shared-name"}, {"space": "socket-1"}):
        for id_ in (1, 2):
            calls: list[tuple[str, dict[str, Any]]] = [
                ("memory.get", {"id": id_}),
                ("memory.update", {"id": id_, "content": "bob was here"}),
                ("memory.update", {"id": id_, "pinned": True}),
                ("memory.delete", {"id": id_}),
            ]
            for name, params in calls:
                with pytest.raises(NotFound):  # never PermissionDenied: nothing is revealed
                    _call(k, name, {**params, **where}, BOB)
        found = _call(k, "memory.search", {"query": "secret", **where}, BOB)
        assert found["hits"] == []
        assert _call(k, "memory.clear", {"keep_pinned": False, **where}, BOB)["removed"] == 0

    # Alice's entries are all still there, unchanged.
    for where in ({}, {"space": "shared-name"}):
        for id_, text in ((1, "alice secret"), (2, "alice evicted secret")):
            assert _call(k, "memory.get", {"id": id_, **where}, ALICE)["content"] == text


def _invalid(k: Kernel, name: str, params: dict[str, Any]) -> InvalidParams:
    with pytest.raises(InvalidParams) as exc:
        _call(k, name, params, ALICE)
    return exc.value


def _fields(err: InvalidParams) -> set[str]:
    return {e["field"] for e in err.data["errors"]}


def test_oversize_content_names_the_field(tmp_path: Path) -> None:
    k = _kernel(tmp_path, max_entry_bytes=16)
    _call(k, "memory.add", {"content": "é" * 8}, ALICE)  # 16 bytes: fits
    err = _invalid(k, "memory.add", {"content": "é" * 9})  # 9 characters, 18 bytes
    assert "content" in err.message and _fields(err) == {"content"}
    err = _invalid(k, "memory.update", {"id": 1, "content": "x" * 17})
    assert "content" in err.message and _fields(err) == {"content"}
    assert _call(k, "memory.get", {"id": 1}, ALICE)["content"] == "é" * 8


@pytest.mark.parametrize("space", ["a/b", "a\x00b", "", "_memory", ".hidden", "x" * 65])
def test_bad_space_names_the_field(tmp_path: Path, space: str) -> None:
    k = _kernel(tmp_path)
    for name, params in (
        ("memory.add", {"content": "x"}),
        ("memory.get", {"id": 1}),
        ("memory.search", {"query": "x"}),
        ("memory.update", {"id": 1, "pinned": True}),
        ("memory.delete", {"id": 1}),
        ("memory.clear", {}),
    ):
        err = _invalid(k, name, {**params, "space": space})
        assert err.message.startswith("invalid params: space:") and _fields(err) == {"space"}


def test_other_bad_input_names_the_field(tmp_path: Path) -> None:
    k = _kernel(tmp_path)
    err = _invalid(k, "memory.update", {"id": 1})
    assert all(f in err.message for f in ("content", "tags", "pinned"))
    err = _invalid(k, "memory.add", {"content": "x", "tags": ["t"] * 33})
    assert _fields(err) == {"tags"}
    err = _invalid(k, "memory.add", {"content": "x", "tags": ["t" * 65]})
    assert _fields(err) == {"tags.0"}
    for limit in (0, 101):
        assert _fields(_invalid(k, "memory.search", {"query": "x", "limit": limit})) == {"limit"}
    assert _fields(_invalid(k, "memory.search", {"query": "   "})) == {"query"}
    assert _fields(_invalid(k, "memory.get", {"id": 0})) == {"id"}
    assert _fields(_invalid(k, "memory.add", {"content": "x", "owner": 5002})) == {"owner"}


def _refused(k: Kernel, name: str, params: dict[str, Any], caller: Caller) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as exc:
        _call(k, name, params, caller)
    return exc.value


def test_a_users_spaces_are_bounded_and_the_refusal_names_the_bound(tmp_path: Path) -> None:
    k = _kernel(tmp_path, max_spaces_per_user=2)
    _call(k, "memory.add", {"content": "in my session"}, ALICE)  # the session is a space
    _call(k, "memory.add", {"content": "x", "space": "a"}, ALICE)
    err = _refused(k, "memory.add", {"content": "x", "space": "b"}, ALICE)
    assert err.to_rpc() == {
        "code": -32013,
        "message": err.message,
        "data": {"limit": "memory.max_spaces_per_user", "value": 2, "needed": 3},
    }
    assert "memory.max_spaces_per_user (2)" in err.message
    # Bob's spaces are his own count.
    for space in ("a", "b"):
        assert _call(k, "memory.add", {"content": "y", "space": space}, BOB)["id"] == 1
    # Emptying a space makes room for another.
    _call(k, "memory.clear", {"space": "a"}, ALICE)
    assert _call(k, "memory.add", {"content": "x", "space": "b"}, ALICE)["id"] == 1


def test_pinned_bytes_are_bounded_and_a_refused_write_changes_nothing(tmp_path: Path) -> None:
    k = _kernel(tmp_path, max_pinned_bytes_per_user=4096)
    first = _call(k, "memory.add", {"content": "p" * 2000, "pinned": True}, ALICE)
    err = _refused(k, "memory.add", {"content": "q" * 2000, "pinned": True}, ALICE)
    assert err.data["limit"] == "memory.max_pinned_bytes_per_user" and err.data["value"] == 4096
    err = _refused(k, "memory.update", {"id": 1, "content": "p" * 4000}, ALICE)
    assert err.data["limit"] == "memory.max_pinned_bytes_per_user"
    with pytest.raises(NotFound):
        _call(k, "memory.get", {"id": 2}, ALICE)
    assert _call(k, "memory.get", {"id": 1}, ALICE)["content"] == first["content"]
    assert _call(k, "memory.add", {"content": "q" * 2000}, ALICE)["id"] == 2  # unpinned fits


def test_administrators_may_pin_beyond_the_users_pinned_budget(tmp_path: Path) -> None:
    # Users together may pin pinned_budget_bytes; an administrator (root here) may pin
    # max_pinned_bytes_per_user beyond it, so users who filled it cannot lock them out.
    k = _kernel(
        tmp_path,
        budget_bytes=64 * 1024,
        pinned_budget_bytes=16 * 1024,
        max_pinned_bytes_per_user=8 * 1024,
    )
    memory = MemorySyscalls(k.memory, k.access)
    root = Caller(uid=0, gid=0, pid=13, session="socket-2")
    carol = Caller(uid=5003, gid=5003, pid=14, session="socket-3")

    def add(caller: Caller) -> Any:
        params = AddParams(content="p" * 3000, pinned=True)
        return asyncio.run(memory.add(params, caller, None))

    for caller in (ALICE, BOB, ALICE, BOB):
        add(caller)
    with pytest.raises(QuotaExceeded) as exc:
        add(carol)
    assert exc.value.data["limit"] == "memory.pinned_budget_bytes"
    assert exc.value.data["value"] == 16 * 1024
    assert add(root).pinned and add(root).pinned
    with pytest.raises(QuotaExceeded) as exc:
        add(root)
    assert exc.value.data["limit"] == "memory.max_pinned_bytes_per_user"

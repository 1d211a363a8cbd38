"""NSS look-ups off the event loop: cached, shared between concurrent callers, misses too."""

from __future__ import annotations

import asyncio
import grp
import pwd
import threading

import pytest

from aiosd.managers import users as users_mod
from aiosd.managers.users import UserDirectory


def test_answers_match_the_system_databases() -> None:
    async def run() -> None:
        d = UserDirectory()
        try:
            assert await d.uid_of("root") == 0
            assert await d.gid_of("root") == grp.getgrnam("root").gr_gid
            assert await d.group_name(0) == grp.getgrgid(0).gr_name
            assert await d.uid_of("no-such-user-aiosd") is None
            assert await d.gid_of("no-such-group-aiosd") is None
        finally:
            d.close()

    asyncio.run(run())


def test_lookups_run_off_the_loop_once_per_name(monkeypatch: pytest.MonkeyPatch) -> None:
    loop_thread: list[int] = []
    calls: list[tuple[str, int]] = []
    release = threading.Event()

    def slow_getpwnam(name: str) -> pwd.struct_passwd:
        calls.append((name, threading.get_ident()))
        # Stands for sssd/LDAP taking its time: the loop must keep running meanwhile.
        assert release.wait(10), "the test never released the look-up"
        return pwd.getpwuid(0)

    monkeypatch.setattr(users_mod.pwd, "getpwnam", slow_getpwnam)

    async def run() -> None:
        loop_thread.append(threading.get_ident())
        d = UserDirectory()
        try:
            lookups = [asyncio.ensure_future(d.uid_of("someone")) for _ in range(20)]
            ticks = 0
            while not calls:  # the loop turns while the look-up waits in its thread
                ticks += 1
                assert ticks < 10_000_000, "the look-up never started"
                await asyncio.sleep(0)
            release.set()
            assert await asyncio.gather(*lookups) == [0] * 20
            assert await d.uid_of("someone") == 0  # cached now
            assert ticks > 0
        finally:
            d.close()

    asyncio.run(run())
    assert len(calls) == 1, "concurrent look-ups of one name must share one query"
    assert calls[0][1] != loop_thread[0], "the look-up ran on the event loop's thread"


def test_a_miss_is_cached_for_the_negative_ttl_only(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def missing(name: str) -> pwd.struct_passwd:
        seen.append(name)
        raise KeyError(name)

    monkeypatch.setattr(users_mod.pwd, "getpwnam", missing)

    async def run() -> None:
        d = UserDirectory(negative_ttl=0.0)
        try:
            assert await d.uid_of("ghost") is None
            assert await d.uid_of("ghost") is None
        finally:
            d.close()

    asyncio.run(run())
    assert seen == ["ghost", "ghost"]  # a zero negative TTL keeps nothing


def test_process_ids_are_the_kernel_view_not_nss() -> None:
    import os

    from aiosd.managers.users import process_ids

    me = process_ids(os.getpid())
    assert me.gid == os.getegid() and me.groups == frozenset(os.getgroups())
    assert me.uids == (os.getuid(), os.geteuid())  # whose the pid is, in the same read
    gone = process_ids(2**22 + 12345)  # no such process: nothing known, no error
    assert gone.gid is None and gone.groups == frozenset() and gone.uids is None

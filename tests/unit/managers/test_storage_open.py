"""Opening and closing users' stores: one open per uid however many first calls race, at most
``max_open_stores`` open at once, a busy store never closed, and nothing left at close."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from aiosd.errors import ShuttingDown
from aiosd.managers.storage import Limits, StorageManager, UserStore

UID = 1001
WAIT = 30.0  # bounds every wait, so a broken manager fails a test instead of hanging it


def manager(tmp_path: Path, max_open: int = 64) -> StorageManager:
    return StorageManager(tmp_path / "storage", "normal", Limits(1 << 30, 1 << 20, 4), max_open)


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(fn())


async def until(event: asyncio.Event) -> None:
    """Wait for ``event``; a broken manager fails the test instead of hanging it."""
    await asyncio.wait_for(event.wait(), WAIT)


def open_uids(directory: Path) -> set[int]:
    """Uids whose database file this process has open (SQLite connections, any thread)."""
    uids: set[int] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed meanwhile
            continue
        if target.parent == directory and target.name.endswith(".sqlite"):
            uids.add(int(target.name.removesuffix(".sqlite")))
    return uids


def put(key: str, value: bytes = b"v") -> Callable[[UserStore], int]:
    """Work that stores ``value`` under ``key`` and returns its version."""
    return lambda s: s.put("c", key, value, True, {})["version"]


def store_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("store")]


class Opens:
    """Records each ``UserStore.open`` (uid, check) and ``close`` (uid), in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, int]] = []
        self.checks: list[tuple[int, bool]] = []
        real_open, real_close = UserStore.open, UserStore.close
        recorder = self

        def open_(store: UserStore, check: bool = True) -> None:
            recorder.checks.append((store.uid, check))
            real_open(store, check)
            recorder.events.append(("open", store.uid))

        def close(store: UserStore) -> None:
            real_close(store)
            recorder.events.append(("close", store.uid))

        monkeypatch.setattr(UserStore, "open", open_)
        monkeypatch.setattr(UserStore, "close", close)


class Blocker:
    """Work that runs in a store until released: ``started`` is set (on the loop) once it runs."""

    def __init__(self, events: list[tuple[str, int]] | None = None) -> None:
        self.started = asyncio.Event()
        self.release = threading.Event()
        self.events = events
        self._loop = asyncio.get_running_loop()

    def __call__(self, store: UserStore) -> int:
        self._loop.call_soon_threadsafe(self.started.set)
        assert self.release.wait(WAIT), "never released"
        version = store.put("c", "blocked", b"still usable", True, {})["version"]
        if self.events is not None:
            self.events.append(("work ends", store.uid))
        return version


def test_concurrent_first_calls_open_the_store_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[int] = []
    real_open = UserStore.open

    async def main() -> None:
        loop, entered, release = asyncio.get_running_loop(), asyncio.Event(), threading.Event()

        def gated_open(store: UserStore, check: bool = True) -> None:
            opened.append(store.uid)
            loop.call_soon_threadsafe(entered.set)
            assert release.wait(WAIT), "never released"
            real_open(store, check)

        monkeypatch.setattr(UserStore, "open", gated_open)
        m = manager(tmp_path)
        try:
            calls = [asyncio.create_task(m.run(UID, put(f"k{i}"))) for i in range(20)]
            # The calls start in order before the open any of them starts, so all 20 are
            # under way while it is held.
            await until(entered)
            release.set()
            assert await asyncio.gather(*calls) == [1] * 20
            assert opened == [UID]
            assert (await m.run(UID, lambda s: s.usage()))["used_entries"] == 20
        finally:
            release.set()
            await m.close()

    run(main)


def test_a_damaged_file_is_quarantined_once_under_concurrent_first_calls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "storage"
    directory.mkdir()
    (directory / f"{UID}.sqlite").write_bytes(b"not a database, " * 4096)

    async def main() -> None:
        m = manager(tmp_path)
        try:
            uses = await asyncio.gather(*(m.run(UID, lambda s: s.usage()) for _ in range(20)))
            assert [u["used_entries"] for u in uses] == [0] * 20
        finally:
            await m.close()

    with caplog.at_level(logging.ERROR, logger="aiosd.managers.storage"):
        run(main)
    aside = sorted(p.name for p in directory.iterdir() if ".corrupt-" in p.name)
    assert len(aside) == 1 and aside[0].startswith(f"{UID}.sqlite.corrupt-")
    assert (directory / aside[0]).read_bytes() == b"not a database, " * 4096
    assert len([r for r in caplog.records if "integrity check" in r.getMessage()]) == 1


def test_open_stores_and_threads_stay_within_max_open_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    limit, users = 3, 8
    directory = tmp_path / "storage"
    peak_open = peak_threads = 0
    real_open = UserStore.open

    def sample() -> None:
        nonlocal peak_open, peak_threads
        peak_open = max(peak_open, len(open_uids(directory)))
        peak_threads = max(peak_threads, len(store_threads()))

    def sampled_open(store: UserStore, check: bool = True) -> None:
        real_open(store, check)
        sample()

    monkeypatch.setattr(UserStore, "open", sampled_open)

    def write(i: int) -> Callable[[UserStore], None]:
        def work(s: UserStore) -> None:
            s.put("c", f"k{i}", f"{s.uid}:{i}".encode(), True, {})
            sample()

        return work

    async def main() -> None:
        m = manager(tmp_path, limit)
        try:
            await asyncio.gather(*(m.run(uid, write(i)) for i in range(3) for uid in range(users)))
            for uid in range(users):
                page = await m.run(uid, lambda s: s.list_keys("c", "", 10, None))
                assert [e["key"] for e in page["entries"]] == ["k0", "k1", "k2"]
                row = await m.run(uid, lambda s: s.get("c", "k2", None))
                assert row["value"] == f"{uid}:2".encode()
                sample()
            assert len(open_uids(directory)) <= limit
        finally:
            await m.close()

    run(main)
    assert 0 < peak_open <= limit
    assert 0 < peak_threads <= limit


def test_an_evicted_store_reopens_transparently_with_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opens = Opens(monkeypatch)
    directory = tmp_path / "storage"

    async def main() -> None:
        m = manager(tmp_path, 1)
        try:
            await m.run(1, lambda s: s.put("c", "k", b"one's", True, {"n": 1}))
            await m.run(2, lambda s: s.put("c", "k", b"two's", True, {}))
            assert open_uids(directory) == {2}  # 1 was closed to make room
            row = await m.run(1, lambda s: s.get("c", "k", None))
            assert (row["value"], row["metadata"], row["version"]) == (b"one's", {"n": 1}, 1)
            assert open_uids(directory) == {1}
        finally:
            await m.close()

    run(main)
    assert opens.events[:4] == [("open", 1), ("close", 1), ("open", 2), ("close", 2)]
    # The integrity check runs at the first open of a run, not again at a reopen.
    assert opens.checks == [(1, True), (2, True), (1, False)]


def test_a_busy_store_is_not_closed_to_make_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opens = Opens(monkeypatch)
    directory = tmp_path / "storage"

    async def main() -> None:
        m = manager(tmp_path, 2)
        block = Blocker()
        try:
            await m.run(1, lambda s: s.put("c", "k", b"1", True, {}))
            await m.run(2, lambda s: s.put("c", "k", b"2", True, {}))
            busy = asyncio.create_task(m.run(1, block))
            await until(block.started)
            await m.run(2, lambda s: s.usage())  # 1 is now the least recently used, and busy
            await m.run(3, lambda s: s.put("c", "k", b"3", True, {}))
            assert not busy.done()
            assert open_uids(directory) == {1, 3}
            assert ("close", 1) not in opens.events
            block.release.set()
            assert await busy == 1  # its connection was still there
        finally:
            block.release.set()
            await m.close()

    run(main)
    assert opens.events.index(("close", 2)) < opens.events.index(("open", 3))


class Told(logging.Handler):
    """Sets ``seen`` when the storage manager logs a message containing ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()  # the manager logs on the event loop's thread


def test_when_every_store_is_busy_a_new_one_waits_for_a_free_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opens = Opens(monkeypatch)
    directory = tmp_path / "storage"
    log = logging.getLogger("aiosd.managers.storage")

    async def main() -> None:
        told = Told("waits for one to be free")
        log.addHandler(told)
        m = manager(tmp_path, 1)
        block = Blocker(opens.events)
        try:
            busy = asyncio.create_task(m.run(1, block))
            await until(block.started)
            second = asyncio.create_task(m.run(2, lambda s: s.put("c", "k", b"2", True, {})))
            await until(told.seen)
            assert not second.done()
            assert open_uids(directory) == {1}
            block.release.set()
            assert await busy == 1
            assert (await second)["version"] == 1
            assert open_uids(directory) == {2}
        finally:
            block.release.set()
            log.removeHandler(told)
            await m.close()

    level = log.level
    log.setLevel(logging.DEBUG)
    try:
        run(main)
    finally:
        log.setLevel(level)
    assert opens.events[:4] == [("open", 1), ("work ends", 1), ("close", 1), ("open", 2)]


def test_the_next_call_waits_for_the_work_of_a_cancelled_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opens = Opens(monkeypatch)

    async def main() -> None:
        m = manager(tmp_path, 2)
        block = Blocker(opens.events)
        try:
            first = asyncio.create_task(m.run(1, block))
            await until(block.started)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            second = asyncio.create_task(
                m.run(1, lambda s: opens.events.append(("second runs", s.uid)))
            )
            # Released after the second call has queued its job (callbacks run in order).
            asyncio.get_running_loop().call_soon(block.release.set)
            await second
        finally:
            block.release.set()
            await m.close()

    run(main)
    assert opens.events == [("open", 1), ("work ends", 1), ("second runs", 1), ("close", 1)]


def test_close_lets_running_calls_end_then_leaves_no_store_open_and_no_thread(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "storage"

    async def main() -> None:
        m = manager(tmp_path, 3)
        block = Blocker()
        try:
            for uid in range(5):
                await m.run(uid, lambda s: s.put("c", "k", b"v", True, {}))
            busy = asyncio.create_task(m.run(4, block))
            await until(block.started)
            assert store_threads()
            closing = asyncio.create_task(m.close())
            asyncio.get_running_loop().call_soon(block.release.set)
            assert await busy == 1
            await closing
        finally:
            block.release.set()
        assert store_threads() == []
        assert open_uids(directory) == set()
        with pytest.raises(ShuttingDown):
            await m.run(0, lambda s: s.usage())

    run(main)

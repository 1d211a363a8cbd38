"""Opening and closing users' stores: one open per uid however many first calls race, at most
``max_open_stores`` open at once, a busy store never closed, only a damaged file moved aside,
and nothing left at close or when a call or an open is cancelled."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from aiosd.errors import AiosError, ShuttingDown
from aiosd.managers import storage
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
            # The user's own calls are told, once.
            told = await asyncio.gather(
                *(m.run(UID, lambda s: s.usage(), tell=True) for _ in range(3)),
                return_exceptions=True,
            )
            errors = [e for e in told if isinstance(e, AiosError)]
            assert len(errors) == 1 and "moved aside to" in errors[0].message
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


@pytest.fixture
def waiting() -> Iterator[Told]:
    """Set once a call waits for room: the storage manager's debug message says so."""
    log = logging.getLogger("aiosd.managers.storage")
    told = Told("waits for one to be free")
    level = log.level
    log.setLevel(logging.DEBUG)
    log.addHandler(told)
    try:
        yield told
    finally:
        log.removeHandler(told)
        log.setLevel(level)


class Gate:
    """``UserStore.open`` held for one uid until released: ``entered`` is set once it waits.

    ``after``: the real open runs first (the connection exists while it waits); ``fail``: it
    raises instead of opening.
    """

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, uid: int, after: bool = False, fail: bool = False
    ) -> None:
        self.entered = asyncio.Event()
        self.release = threading.Event()
        loop = asyncio.get_running_loop()
        real_open = UserStore.open

        def gated_open(store: UserStore, check: bool = True) -> None:
            if store.uid != uid:
                real_open(store, check)
                return
            if after:
                real_open(store, check)
            loop.call_soon_threadsafe(self.entered.set)
            assert self.release.wait(WAIT), "never released"
            if fail:
                raise RuntimeError("the open failed")
            if not after:
                real_open(store, check)

        monkeypatch.setattr(UserStore, "open", gated_open)


def hold_lock(path: Path) -> sqlite3.Connection:
    """Another program's exclusive lock on ``path``; in WAL mode only the exclusive locking
    mode keeps readers out too."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA locking_mode = EXCLUSIVE")
    db.execute("BEGIN EXCLUSIVE")
    return db


def aside(directory: Path) -> list[str]:
    """Files moved aside as damaged."""
    return [p.name for p in directory.iterdir() if ".corrupt-" in p.name]


@pytest.mark.parametrize("reopen", [False, True], ids=["first open", "reopen after eviction"])
def test_a_locked_file_is_left_in_place_and_opens_once_the_lock_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reopen: bool
) -> None:
    monkeypatch.setattr(storage, "BUSY_TIMEOUT", 0.05)  # the lock outlasts it at once
    directory = tmp_path / "storage"

    async def main() -> None:
        m = manager(tmp_path, 1)
        try:
            await m.run(1, put("k", b"kept"))
            await m.run(2, put("k"))  # 1 is closed to make room
            if not reopen:
                await m.close()
                m = manager(tmp_path, 1)
            lock = hold_lock(directory / "1.sqlite")
            try:
                with pytest.raises(AiosError) as err:
                    await m.run(1, lambda s: s.get("c", "k", None))
                assert "uid 1 could not be opened: database is locked" in err.value.message
                assert aside(directory) == []
            finally:
                lock.execute("ROLLBACK")
                lock.close()
            row = await m.run(1, lambda s: s.get("c", "k", None))
            assert (row["value"], row["version"]) == (b"kept", 1)
            assert aside(directory) == []
        finally:
            await m.close()

    run(main)


def test_a_file_damaged_while_the_daemon_runs_is_moved_aside_at_a_reopen(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "storage"

    async def main() -> None:
        m = manager(tmp_path, 1)
        try:
            await m.run(1, put("k"))
            await m.run(2, put("k"))  # 1 is closed to make room
            (directory / "1.sqlite").write_bytes(b"not a database, " * 4096)
            with pytest.raises(AiosError, match="uid 1 was found damaged \\(file is not a data"):
                await m.run(1, lambda s: s.usage(), tell=True)
            # Without a restart: the next call has a new, empty store.
            assert (await m.run(1, lambda s: s.usage(), tell=True))["used_entries"] == 0
        finally:
            await m.close()

    run(main)
    (moved,) = [name for name in aside(directory) if not name.endswith(("-wal", "-shm"))]
    assert (directory / moved).read_bytes() == b"not a database, " * 4096


def test_a_failing_pragma_closes_the_connection_it_was_run_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "BUSY_TIMEOUT", 0.05)
    path = tmp_path / "0.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA user_version = 1")
    db.close()
    # A writer lets the file be read but not switched to WAL (which needs it alone).
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    made: list[sqlite3.Connection] = []
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        made.append(real_connect(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sqlite3, "connect", connect)
    store = UserStore(path, 0, "normal", Limits(1 << 30, 1 << 20, 4))
    try:
        with pytest.raises(AiosError, match="could not be opened: database is locked"):
            store.open()
    finally:
        writer.close()
    assert store.db is None
    assert len(made) == 3  # to read the version, to check the file, the connection proper
    for connection in made:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            connection.execute("SELECT 1")


def test_an_open_whose_callers_gave_up_still_makes_room_for_one_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waiting: Told
) -> None:
    directory = tmp_path / "storage"

    async def main() -> None:
        gate = Gate(monkeypatch, 1)
        m = manager(tmp_path, 1)
        try:
            first = asyncio.create_task(m.run(1, put("k")))
            await until(gate.entered)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            second = asyncio.create_task(m.run(2, put("k")))
            await until(waiting.seen)
            gate.release.set()
            assert await asyncio.wait_for(second, WAIT) == 1
            assert open_uids(directory) == {2}
        finally:
            gate.release.set()
            await m.close()

    run(main)


def test_a_store_just_opened_is_not_closed_before_its_calls_use_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waiting: Told
) -> None:
    opens = Opens(monkeypatch)

    async def main() -> None:
        gate = Gate(monkeypatch, 1)
        m = manager(tmp_path, 1)
        try:
            first = asyncio.create_task(m.run(1, put("k")))
            await until(gate.entered)
            second = asyncio.create_task(m.run(2, put("k")))
            await until(waiting.seen)
            gate.release.set()
            assert await first == 1
            assert await second == 1
        finally:
            gate.release.set()
            await m.close()

    run(main)
    # 1 opened once: the one waiting for room, woken by that open, left it to its call.
    assert opens.checks == [(1, True), (2, True)]
    assert opens.events == [("open", 1), ("close", 1), ("open", 2), ("close", 2)]


def test_a_close_under_way_is_the_room_one_waiting_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opens = Opens(monkeypatch)
    directory = tmp_path / "storage"

    async def main() -> None:
        loop, closing, release = asyncio.get_running_loop(), asyncio.Event(), threading.Event()
        recorded_close = UserStore.close

        def slow_close(store: UserStore) -> None:
            if store.uid == 1:
                loop.call_soon_threadsafe(closing.set)
                assert release.wait(WAIT), "never released"
            recorded_close(store)

        monkeypatch.setattr(UserStore, "close", slow_close)
        m = manager(tmp_path, 2)
        try:
            await m.run(1, put("k"))
            await m.run(2, put("k"))
            third = asyncio.create_task(m.run(3, put("k")))
            await until(closing)  # 1, the least recently used, closes for 3
            await m.run(2, put("k2"))  # 2 is free again, and 3 looks again
            release.set()
            assert await third == 1
            assert open_uids(directory) == {2, 3}
            assert ("close", 2) not in opens.events
        finally:
            release.set()
            await m.close()

    run(main)


def test_a_store_still_running_a_given_up_job_is_not_the_one_closed_for_room(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "storage"

    async def main() -> None:
        m = manager(tmp_path, 2)
        block = Blocker()
        try:
            await m.run(1, put("k"))
            await m.run(2, put("k"))
            busy = asyncio.create_task(m.run(1, block))
            await until(block.started)
            await m.run(2, lambda s: s.usage())  # 1 is the least recently used
            busy.cancel()
            with pytest.raises(asyncio.CancelledError):
                await busy
            # 1 is idle but would close only after its job: 2 closes, and 3 need not wait.
            assert await asyncio.wait_for(m.run(3, put("k")), WAIT) == 1
            assert open_uids(directory) == {1, 3}
            block.release.set()
            keys = await m.run(1, lambda s: s.list_keys("c", "", 10, None))
            assert [e["key"] for e in keys["entries"]] == ["blocked", "k"]
        finally:
            block.release.set()
            await m.close()

    run(main)


def test_an_open_that_fails_after_its_callers_gave_up_leaves_no_unretrieved_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, waiting: Told, caplog: pytest.LogCaptureFixture
) -> None:
    reported: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: reported.append(context["message"]))
        gate = Gate(monkeypatch, 1, fail=True)
        m = manager(tmp_path, 1)
        try:
            first = asyncio.create_task(m.run(1, put("k")))
            await until(gate.entered)
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            second = asyncio.create_task(m.run(2, put("k")))
            await until(waiting.seen)
            gate.release.set()
            assert await asyncio.wait_for(second, WAIT) == 1  # the failed open freed its room
            gc.collect()  # a task's unretrieved exception is reported when it is collected
        finally:
            gate.release.set()
            await m.close()

    with caplog.at_level(logging.DEBUG, logger="aiosd.managers.storage"):  # as `waiting`
        run(main)
    assert reported == []
    # Not an error the store expects: logged, since no caller is left to report it.
    failed = [r for r in caplog.records if "opening the storage of uid 1 failed" in r.message]
    assert [str(r.exc_info[1]) for r in failed if r.exc_info] == ["the open failed"]


def test_cancelling_an_open_under_way_closes_what_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "storage"

    async def main() -> None:
        gate = Gate(monkeypatch, 1, after=True)
        m = manager(tmp_path, 1)
        try:
            first = asyncio.create_task(m.run(1, put("k")))
            await until(gate.entered)  # its connection is open
            opens = [
                t
                for t in asyncio.all_tasks()
                if getattr(t.get_coro(), "__qualname__", "") == "StorageManager._open_store"
            ]
            assert len(opens) == 1
            opens[0].cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            second = asyncio.create_task(m.run(2, put("k")))
            gate.release.set()
            # 2 opens once 1's connection is closed, not beside it.
            assert await asyncio.wait_for(second, WAIT) == 1
            assert open_uids(directory) == {2}
        finally:
            gate.release.set()
            await m.close()

    run(main)


def test_a_cancelled_call_whose_job_has_not_started_never_runs(tmp_path: Path) -> None:
    directory = tmp_path / "storage"
    ran: list[int] = []

    async def main() -> None:
        m = manager(tmp_path, 1)
        block = Blocker()
        try:
            busy = asyncio.create_task(m.run(1, block))
            await until(block.started)
            queued = asyncio.create_task(m.run(1, lambda s: ran.append(s.uid)))
            # Cancelled after its first step has queued its job (callbacks run in order).
            asyncio.get_running_loop().call_soon(queued.cancel)
            with pytest.raises(asyncio.CancelledError):
                await queued
            block.release.set()
            assert await busy == 1
            # It holds the store no more: the store closes to make room for another.
            await m.run(2, put("k"))
            assert open_uids(directory) == {2}
        finally:
            block.release.set()
            await m.close()

    run(main)
    assert ran == []


def test_close_during_an_open_refuses_its_calls_and_closes_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "storage"
    ran: list[int] = []

    async def main() -> None:
        gate = Gate(monkeypatch, 1, after=True)
        m = manager(tmp_path)
        try:
            first = asyncio.create_task(m.run(1, lambda s: ran.append(s.uid)))
            await until(gate.entered)
            closing = asyncio.create_task(m.close())
            # Released once close has begun (callbacks run in order).
            asyncio.get_running_loop().call_soon(gate.release.set)
            with pytest.raises(ShuttingDown):
                await first
            await closing
        finally:
            gate.release.set()
            await m.close()
        assert open_uids(directory) == set()
        assert store_threads() == []

    run(main)
    assert ran == []
    assert (directory / "1.sqlite").exists()  # the open ran to its end

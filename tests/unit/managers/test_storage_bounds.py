"""What a user can make the store hold is bounded and counted honestly, and the files the
store keeps are private, never silently replaced, and recovered without a restart.

* quota bytes count everything a version stores (value, key, collection, metadata, a row),
  the search index's copy of the current version, and the shares;
* files are 0600 and directories 0700 whatever the umask;
* a zero-length, damaged or failing database is moved aside or reopened, and its user told
  by an error (the user's own next call); an administrator's quotas and that news live in the
  daemon's ledger, outside the user's database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import stat
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from aiosd.errors import AiosError, InvalidParams, QuotaExceeded
from aiosd.managers.storage import (
    LEDGER_FILE,
    SCHEMA,
    Limits,
    StorageManager,
    UserStore,
)

UID = 1001
BIG = 1 << 40


def manager(directory: Path, limits: Limits | None = None, max_open: int = 64) -> StorageManager:
    return StorageManager(directory, "normal", limits or Limits(BIG, 1 << 20, 4), max_open)


def run(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(fn())


def disk_bytes(store: UserStore) -> int:
    """The database's size with everything checkpointed into the main file."""
    assert store.db is not None
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store.path.stat().st_size


def empty_size(tmp_path: Path) -> int:
    """The size of a store with nothing in it (its schema's pages)."""
    store = UserStore(tmp_path / "empty" / "0.sqlite", 0, "normal", Limits(BIG, BIG, 4))
    store.open()
    try:
        return disk_bytes(store)
    finally:
        store.close()


def aside(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if ".corrupt-" in p.name)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_000() -> Iterator[None]:
    """The most permissive umask: whatever the store makes gets only the modes it asks for."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# --- finding 7: quota bytes count everything a version stores -------------------------------


def test_metadata_counts_and_the_file_on_disk_stays_within_the_bytes_counted(
    tmp_path: Path,
) -> None:
    store = UserStore(tmp_path / "0.sqlite", 0, "normal", Limits(BIG, BIG, 4))
    store.open()
    try:
        meta = {"m": "y" * 200_000}
        for i in range(10):
            store.put("c", f"k{i}", b"x", True, meta)
        used = store.usage()["used_bytes"]
        stored_meta = len(json.dumps(meta, sort_keys=True))
        # Each version counts its value, key, collection and serialized metadata at least.
        assert used >= 10 * (1 + len("k0") + len("c") + stored_meta)
        # And the file holds no more than what is counted, beyond an empty store's pages.
        assert disk_bytes(store) <= used + empty_size(tmp_path)
    finally:
        store.close()


def test_metadata_over_the_byte_quota_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "0.sqlite", 0, "normal", Limits(500_000, BIG, 4))
    store.open()
    try:
        store.put("c", "small", b"x", True, {"note": "fits"})
        before = store.usage()
        with pytest.raises(QuotaExceeded) as err:
            store.put("c", "big", b"x", True, {"m": "y" * 600_000})
        assert err.value.data["exceeded"] == "bytes"
        assert err.value.data["needed_bytes"] > 600_000
        assert store.usage() == before
        assert [e["key"] for e in store.list_keys("c", "", 10, None)["entries"]] == ["small"]
    finally:
        store.close()


def test_key_names_count_against_the_byte_quota(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "0.sqlite", 0, "normal", Limits(200_000, BIG, 4))
    store.open()
    try:
        accepted = 0
        with pytest.raises(QuotaExceeded):
            for i in range(10_000):
                store.put("c", f"{i:04}" + "k" * 996, b"", True, {})
                accepted += 1
        # A 1000-byte key costs at least its bytes: at most 200 of them fit in 200000 bytes.
        assert 0 < accepted < 200
        assert store.usage()["used_bytes"] <= 200_000
    finally:
        store.close()


def test_deleted_keys_keep_counting_their_names_so_put_delete_cycles_are_bounded(
    tmp_path: Path,
) -> None:
    store = UserStore(tmp_path / "0.sqlite", 0, "normal", Limits(200_000, BIG, 4))
    store.open()
    try:
        cycles = 0
        with pytest.raises(QuotaExceeded) as err:
            for i in range(10_000):
                key = f"{i:04}" + "k" * 996
                store.put("c", key, b"x", True, {})
                store.delete("c", key)
                cycles += 1
        assert err.value.data["exceeded"] == "bytes"
        # Each cycle keeps a version and a deletion marker, each with its 1001 bytes of names.
        assert 0 < cycles <= 100
        use = store.usage()
        assert use["used_entries"] <= 1
        assert use["used_bytes"] <= 200_000
    finally:
        store.close()


def test_a_delete_over_the_byte_quota_is_refused_but_a_purge_frees_bytes(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "0.sqlite", 0, "normal", Limits(BIG, BIG, 4))
    store.open()
    try:
        # Binary, so not in the search index: its deletion frees less than its marker takes.
        store.put("c", "k", b"\x00" * 1000, False, {})
        use = store.usage()
        store.set_quota(use["used_bytes"], None)  # full: a deletion marker does not fit
        with pytest.raises(QuotaExceeded) as err:
            store.delete("c", "k")
        assert "purge" in err.value.message
        assert store.usage()["used_entries"] == 1
        store.purge("c", "k")
        after = store.usage()
        assert (after["used_bytes"], after["used_entries"]) == (0, 0)
    finally:
        store.close()


def test_shares_count_against_the_byte_quota(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "0.sqlite", 0, "normal", Limits(100_000, BIG, 4))
    store.open()
    try:
        made = 0
        with pytest.raises(QuotaExceeded):
            for i in range(100_000):
                store.share(f"{i:06}" + "c" * 122, 4242, "read")
                made += 1
        assert 0 < made < 100_000 // 128
        assert len(store.shares()) == made
        assert store.usage()["used_bytes"] <= 100_000
        before = store.usage()["used_bytes"]
        assert store.unshare(f"{0:06}" + "c" * 122, 4242)
        assert store.usage()["used_bytes"] < before
    finally:
        store.close()


def test_a_version_1_file_is_migrated_with_its_bytes_recounted(tmp_path: Path) -> None:
    """A file of schema version 1 counted only values; the migration counts it all."""
    path = tmp_path / "storage" / f"{UID}.sqlite"
    path.parent.mkdir()
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(SCHEMA)
    meta = json.dumps({"m": "y" * 50_000})
    db.execute(
        "INSERT INTO versions(id, collection, key, version, value, is_text, metadata, size, "
        "created) VALUES (1, 'c', 'k', 1, ?, 1, ?, 1, 100.0)",
        (b"x", meta),
    )
    db.execute("INSERT INTO heads VALUES ('c', 'k', 1)")
    db.execute(
        "INSERT INTO search(rowid, collection, key, body, meta) VALUES (1, 'c', 'k', 'x', ?)",
        ("m " + "y" * 50_000,),
    )
    db.execute("PRAGMA user_version = 1")
    assert db.execute("SELECT bytes FROM usage").fetchone()[0] == 1
    db.close()

    store = UserStore(path, UID, "normal", Limits(BIG, BIG, 4))
    store.open()
    try:
        use = store.usage()
        assert use["used_bytes"] >= 1 + len("c") + len("k") + len(meta)
        # The same count a fresh store gives the same data.
        fresh = UserStore(tmp_path / "fresh" / f"{UID}.sqlite", UID, "normal", Limits(BIG, BIG, 4))
        fresh.open()
        try:
            fresh.put("c", "k", b"x", True, json.loads(meta))
            assert fresh.usage()["used_bytes"] == use["used_bytes"]
        finally:
            fresh.close()
    finally:
        store.close()


# --- finding 13: private files, whatever the umask -------------------------------------------


def test_files_are_0600_and_directories_0700_whatever_the_umask(
    tmp_path: Path, umask_000: None
) -> None:
    state = tmp_path / "state"
    directory = state / "storage"

    async def main() -> None:
        m = manager(directory)
        try:
            await m.run(UID, lambda s: s.put("c", "k", b"v", True, {}))
            await m.run(UID, lambda s: s.set_quota(1 << 30, None))
            for name in (f"{UID}.sqlite", f"{UID}.sqlite-wal", f"{UID}.sqlite-shm"):
                assert mode(directory / name) == 0o600, name
            assert mode(directory / LEDGER_FILE) == 0o600
            assert mode(directory) == 0o700
            assert mode(state) == 0o700
        finally:
            await m.close()

    run(main)
    # Whatever is left after the close is private too.
    for p in directory.iterdir():
        assert mode(p) == 0o600, p.name


def test_files_and_directories_left_loose_by_an_older_run_are_made_private(
    tmp_path: Path, umask_000: None
) -> None:
    directory = tmp_path / "storage"
    path = directory / f"{UID}.sqlite"
    directory.mkdir(mode=0o755)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("CREATE TABLE t(x)")
    # An older run left the main file and its -wal and -shm readable by all.
    keep = sqlite3.connect(path, isolation_level=None)
    keep.execute("SELECT * FROM t").fetchall()
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        os.chmod(p, 0o644)
    os.chmod(directory, 0o755)

    async def main() -> None:
        m = manager(directory)
        try:
            await m.run(UID, lambda s: s.put("c", "k", b"v", True, {}))
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                assert mode(p) == 0o600, p.name
            assert mode(directory) == 0o700
        finally:
            await m.close()

    try:
        run(main)
    finally:
        keep.close()
        db.close()


def test_a_store_whose_creation_fails_leaves_no_file_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "storage"
    store = UserStore(directory / f"{UID}.sqlite", UID, "normal", Limits(BIG, BIG, 4))

    def fail(*_: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(UserStore, "_migrate", fail)
    with pytest.raises(AiosError, match="could not be opened"):
        store.open()
    # Nothing half-made that a later open could take for an empty or damaged store.
    assert sorted(p.name for p in directory.iterdir()) == []


# --- finding 13: a zero-length file, quotas outside the user's database ----------------------


def test_a_zero_length_database_is_moved_aside_reported_and_keeps_its_quota(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "storage"
    path = directory / f"{UID}.sqlite"

    async def main() -> None:
        m = manager(directory)
        try:
            await m.run(UID, lambda s: s.put("c", "k", b"v", True, {}))
            await m.run(UID, lambda s: s.set_quota(12345, 67))
        finally:
            await m.close()
        path.write_bytes(b"")  # truncated to nothing while the daemon was stopped
        m = manager(directory)
        try:
            # The user's own call is told, instead of silently getting an empty store.
            with pytest.raises(AiosError) as err:
                await m.run(UID, lambda s: s.usage(), tell=True)
            message = err.value.message
            assert f"storage of uid {UID}" in message and "empty (0 bytes)" in message
            (moved,) = aside(directory)
            assert moved.name in message and "recover" in message
            assert moved.stat().st_size == 0
            # Once: the next call gets the empty store, under the administrator's quotas still.
            use = await m.run(UID, lambda s: s.usage(), tell=True)
            assert (use["used_entries"], use["quota_bytes"], use["quota_entries"]) == (0, 12345, 67)
        finally:
            await m.close()

    with caplog.at_level(logging.ERROR, logger="aiosd.managers.storage"):
        run(main)
    assert any("empty" in r.getMessage() and "moved" in r.getMessage() for r in caplog.records)


def test_quotas_an_administrator_set_outlive_the_users_database(tmp_path: Path) -> None:
    directory = tmp_path / "storage"

    async def main() -> None:
        m = manager(directory)
        try:
            await m.run(UID, lambda s: s.set_quota(5000, 7))
        finally:
            await m.close()
        for p in directory.glob(f"{UID}.sqlite*"):
            p.unlink()  # the user's database is gone entirely
        m = manager(directory)
        try:
            use = await m.run(UID, lambda s: s.usage())
            assert (use["quota_bytes"], use["quota_entries"]) == (5000, 7)
            other = await m.run(UID + 1, lambda s: s.usage())
            assert (other["quota_bytes"], other["quota_entries"]) == (BIG, 1 << 20)
        finally:
            await m.close()

    run(main)


def test_quotas_kept_in_an_older_users_database_move_to_the_daemons_own(tmp_path: Path) -> None:
    directory = tmp_path / "storage"
    path = directory / f"{UID}.sqlite"
    directory.mkdir()
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(SCHEMA)
    db.execute("INSERT INTO settings VALUES ('quota_bytes', 9000), ('quota_entries', 9)")
    db.execute("PRAGMA user_version = 1")
    db.close()

    async def main() -> None:
        m = manager(directory)
        try:
            use = await m.run(UID, lambda s: s.usage())
            assert (use["quota_bytes"], use["quota_entries"]) == (9000, 9)
        finally:
            await m.close()
        path.unlink()
        m = manager(directory)
        try:
            use = await m.run(UID, lambda s: s.usage())
            assert (use["quota_bytes"], use["quota_entries"]) == (9000, 9)
        finally:
            await m.close()

    run(main)


# --- finding 13: damage while running ---------------------------------------------------------


def drop_cache(store: UserStore) -> None:
    """Let the connection forget the pages it read, so its next query reads the file."""
    assert store.db is not None
    store.db.execute("PRAGMA shrink_memory")


def checkpoint(store: UserStore) -> None:
    assert store.db is not None
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_a_database_damaged_while_running_is_moved_aside_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "storage"
    path = directory / "1.sqlite"

    async def main() -> None:
        m = manager(directory)
        try:
            await m.run(1, lambda s: s.put("c", "k", b"one", True, {}))
            await m.run(1, lambda s: s.set_quota(4321, None))
            await m.run(2, lambda s: s.put("c", "k", b"two", True, {}))
            await m.run(1, checkpoint)
            path.write_bytes(b"not a database, " * 4096)
            await m.run(1, drop_cache)
            with pytest.raises(AiosError) as err:
                await m.run(1, lambda s: s.get("c", "k", None), tell=True)
            assert "storage of uid 1 failed" in err.value.message
            assert "reopen" in err.value.message
            # Another user is not affected.
            assert (await m.run(2, lambda s: s.get("c", "k", None)))["value"] == b"two"
            # The next call reopens the file, finds it damaged and moves it aside, and the
            # user is told.
            with pytest.raises(AiosError) as err:
                await m.run(1, lambda s: s.usage(), tell=True)
            (moved, *_) = aside(directory)
            assert moved.name in err.value.message
            # And the one after that has an empty store, with its quota.
            use = await m.run(1, lambda s: s.usage(), tell=True)
            assert (use["used_entries"], use["quota_bytes"]) == (0, 4321)
            assert (await m.run(1, lambda s: s.put("c", "k", b"again", True, {})))["version"] == 1
        finally:
            await m.close()

    with caplog.at_level(logging.ERROR, logger="aiosd.managers.storage"):
        run(main)
    assert [p.name for p in aside(directory) if not p.name.endswith(("-wal", "-shm"))]


def test_a_store_that_failed_while_running_is_reopened_with_its_data_when_the_file_is_sound(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "storage"
    path = directory / "1.sqlite"

    async def main() -> None:
        m = manager(directory)
        try:
            await m.run(1, lambda s: s.put("c", "k", b"kept", True, {}))
            await m.run(1, checkpoint)
            good = path.read_bytes()
            path.write_bytes(b"\x00" * len(good))  # unreadable for a moment
            await m.run(1, drop_cache)
            with pytest.raises(AiosError, match="storage of uid 1 failed"):
                await m.run(1, lambda s: s.get("c", "k", None))
            path.write_bytes(good)  # the moment has passed
            row = await m.run(1, lambda s: s.get("c", "k", None))
            assert (row["value"], row["version"]) == (b"kept", 1)
            assert aside(directory) == []
        finally:
            await m.close()

    run(main)


def test_damage_found_by_the_daemons_own_call_is_told_to_the_user_even_after_a_restart(
    tmp_path: Path,
) -> None:
    """Memory moved to storage, a session's end, another user's read of a share: the call
    that finds the damage need not be the user's; the user's own next call is told."""
    directory = tmp_path / "storage"
    path = directory / f"{UID}.sqlite"

    async def main() -> None:
        m = manager(directory)
        try:
            await m.run(UID, lambda s: s.put("c", "k", b"v", True, {}))
        finally:
            await m.close()
        path.write_bytes(b"not a database, " * 4096)
        m = manager(directory)
        try:
            # The daemon's own call goes on, on a new, empty store.
            assert await m.run_existing(UID, lambda s: s.usage()["used_entries"], -1) == 0
        finally:
            await m.close()
        m = manager(directory)  # a restart: the news is in the daemon's ledger
        try:
            with pytest.raises(AiosError, match="was found damaged .* moved aside to"):
                await m.run(UID, lambda s: s.usage(), tell=True)
            assert (await m.run(UID, lambda s: s.usage(), tell=True))["used_entries"] == 0
        finally:
            await m.close()

    run(main)


def test_a_store_that_keeps_failing_as_damaged_after_a_reopen_is_moved_aside(
    tmp_path: Path,
) -> None:
    """Damage a check does not see (the check passes at the reopen) but SQLite keeps
    reporting: the second failure in a row without a success moves the file aside."""
    directory = tmp_path / "storage"

    def malformed(_: UserStore) -> None:
        exc = sqlite3.DatabaseError("database disk image is malformed")
        exc.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
        raise exc

    async def main() -> None:
        m = manager(directory)
        try:
            await m.run(1, lambda s: s.put("c", "k", b"v", True, {}))
            for _ in range(2):  # the second reopens the file, which passes its check
                with pytest.raises(AiosError, match="storage of uid 1 failed: database disk"):
                    await m.run(1, malformed, tell=True)
            assert aside(directory) == []
            with pytest.raises(AiosError, match="failed as damaged 2 times in a row"):
                await m.run(1, lambda s: s.usage(), tell=True)
            assert aside(directory)
            assert (await m.run(1, lambda s: s.usage(), tell=True))["used_entries"] == 0
        finally:
            await m.close()

    run(main)


@pytest.mark.parametrize(
    ("field", "write"),
    [
        ("key", lambda s: s.put("c", "k\ud800", b"v", True, {})),
        ("collection", lambda s: s.put("c\udfff", "k", b"v", True, {})),
        ("metadata", lambda s: s.put("c", "k", b"v", True, {"note": "\ud800"})),
        ("collection", lambda s: s.share("c\ud800", 7, "read")),
    ],
)
def test_text_sqlite_cannot_store_is_refused_by_name_and_changes_nothing(
    tmp_path: Path, field: str, write: Callable[[UserStore], object]
) -> None:
    store = UserStore(tmp_path / "0.sqlite", 0, "normal", Limits(BIG, BIG, 4))
    store.open()
    try:
        before = store.usage()
        with pytest.raises(InvalidParams, match=f"invalid params: {field}: not valid Unicode"):
            write(store)
        assert store.usage() == before
    finally:
        store.close()

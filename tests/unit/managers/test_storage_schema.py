"""Schema versions: today's files (user_version 0) open as version 1 with their data, each
migration is one transaction, and a file newer than the code is refused untouched."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sqlite3
from pathlib import Path

import pytest

from aiosd.errors import AiosError
from aiosd.managers import storage
from aiosd.managers.storage import MIGRATIONS, SCHEMA, Limits, StorageManager, UserStore

UID = 1001


def manager(tmp_path: Path) -> StorageManager:
    return StorageManager(tmp_path / "storage", "normal", Limits(1 << 30, 1 << 20, 4))


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def tables(path: Path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        db.close()


def write_todays_file(path: Path) -> None:
    """A store as the aiosd of before schema versions left it, written with plain sqlite3."""
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(SCHEMA)
    rows = [  # (id, key, version, value, is_text, metadata, created, deleted)
        (1, "a", 1, b"hello world", 1, {"tag": "greeting"}, 100.0, 0),
        (2, "b", 1, b"\x00\x01binary", 0, {}, 101.0, 0),
        (3, "b", 2, b"second draft", 1, {}, 102.0, 0),
        (4, "gone", 1, b"old", 1, {}, 103.0, 0),
        (5, "gone", 2, None, 0, {}, 104.0, 1),
    ]
    for id_, key, version, value, is_text, meta, created, deleted in rows:
        db.execute(
            "INSERT INTO versions(id, collection, key, version, value, is_text, metadata, size, "
            "created, deleted) VALUES (?, 'notes', ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                id_,
                key,
                version,
                value,
                is_text,
                json.dumps(meta),
                len(value or b""),
                created,
                deleted,
            ),
        )
    for key, head in (("a", 1), ("b", 3)):
        db.execute("INSERT INTO heads VALUES ('notes', ?, ?)", (key, head))
    indexed = ((1, "a", "hello world", "tag greeting"), (3, "b", "second draft", ""))
    for id_, key, body, meta_text in indexed:
        db.execute(
            "INSERT INTO search(rowid, collection, key, body, meta) VALUES (?, 'notes', ?, ?, ?)",
            (id_, key, body, meta_text),
        )
    db.execute("INSERT INTO shares VALUES ('notes', 4242, 'read')")
    db.execute("INSERT INTO settings VALUES ('quota_entries', 50)")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    db.close()


def test_todays_file_at_version_0_opens_as_current_with_its_data(tmp_path: Path) -> None:
    path = tmp_path / "storage" / f"{UID}.sqlite"
    write_todays_file(path)

    async def main() -> None:
        m = manager(tmp_path)
        try:
            a = await m.run(UID, lambda s: s.get("notes", "a", None))
            assert (a["value"], a["is_text"], a["metadata"], a["version"], a["created"]) == (
                b"hello world",
                True,
                {"tag": "greeting"},
                1,
                100.0,
            )
            b1 = await m.run(UID, lambda s: s.get("notes", "b", 1))
            assert (b1["value"], b1["is_text"]) == (b"\x00\x01binary", False)
            history = await m.run(UID, lambda s: s.history("notes", "gone"))
            assert [v["deleted"] for v in history["versions"]] == [False, True]
            page = await m.run(UID, lambda s: s.list_keys("notes", "", 10, None))
            assert [(e["key"], e["version"]) for e in page["entries"]] == [("a", 1), ("b", 2)]
            hits = await m.run(UID, lambda s: s.search("hello", ["notes"], {}, 10, 0))
            assert [h["key"] for h in hits] == ["a"]
            assert await m.run(UID, lambda s: s.shares()) == [
                {"collection": "notes", "gid": 4242, "mode": "read"}
            ]
            usage = await m.run(UID, lambda s: s.usage())
            # Every byte counts (schema version 2): each version's value, metadata, twice
            # its names and 64; each current version twice its text and metadata, twice its
            # names and 32; the share its collection and 32.
            versions = (11 + 19 + 12) + (8 + 2 + 12) + (12 + 2 + 12) + (3 + 2 + 18) + (2 + 18)
            current = 2 * (11 + 19) + 12 + 32 + 2 * (12 + 2) + 12 + 32
            assert (usage["used_bytes"], usage["used_entries"], usage["quota_entries"]) == (
                versions + 5 * 64 + current + len("notes") + 32,
                2,
                50,
            )
            put = await m.run(UID, lambda s: s.put("notes", "b", b"third", True, {}))
            assert put["version"] == 3
        finally:
            await m.close()

    asyncio.run(main())
    assert user_version(path) == len(MIGRATIONS) == 2
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


def test_a_new_file_starts_at_the_current_version(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "0.sqlite", 0, "normal", Limits(1 << 30, 1 << 20, 4))
    store.open()
    store.close()
    assert user_version(tmp_path / "0.sqlite") == len(MIGRATIONS)


def test_a_newer_schema_version_is_refused_and_the_file_left_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "storage"
    directory.mkdir()
    path = directory / f"{UID}.sqlite"
    newer = len(MIGRATIONS) + 1
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(
        f"CREATE TABLE future(x); INSERT INTO future VALUES (1); PRAGMA user_version = {newer};"
    )
    db.close()
    before = hashlib.sha256(path.read_bytes()).hexdigest()

    async def main() -> None:
        m = manager(tmp_path)
        try:
            for _ in range(2):  # refused each time, never opened half-way
                with pytest.raises(AiosError) as err:
                    await m.run(UID, lambda s: s.usage())
                assert type(err.value) is AiosError
                assert f"schema version {newer}" in err.value.message
                assert "newer aiosd" in err.value.message
        finally:
            await m.close()

    with caplog.at_level(logging.ERROR, logger="aiosd.managers.storage"):
        asyncio.run(main())
    assert sorted(p.name for p in directory.iterdir()) == [path.name]  # no aside, no -wal
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert any(f"schema version {newer}" in r.getMessage() for r in caplog.records)


def test_each_migration_runs_in_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "0.sqlite"
    current = len(MIGRATIONS)

    def open_with(*later: str) -> UserStore:
        monkeypatch.setattr(storage, "MIGRATIONS", (*MIGRATIONS, *later))
        store = UserStore(path, 0, "normal", Limits(1 << 30, 1 << 20, 4))
        store.open()
        return store

    store = open_with()
    store.put("c", "k", b"kept", True, {})
    store.close()
    failing = "CREATE TABLE extra(x); INSERT INTO extra VALUES (1); SELECT no_such_function();"
    with pytest.raises(AiosError, match="could not be opened: no such function: no_such_function"):
        open_with(failing)
    assert user_version(path) == current
    assert "extra" not in tables(path)  # nothing of the failed step is left

    store = open_with("CREATE TABLE extra(x); INSERT INTO extra VALUES (1);")
    assert store.db is not None
    assert store.db.execute("SELECT x FROM extra").fetchall() == [(1,)]
    assert store.get("c", "k", None)["value"] == b"kept"
    store.close()
    assert user_version(path) == current + 1


def test_a_failed_migration_to_version_2_leaves_version_1_as_it_was(tmp_path: Path) -> None:
    """The step that recounts the bytes is one transaction: a failure leaves version 1."""
    path = tmp_path / "storage" / f"{UID}.sqlite"
    write_todays_file(path)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA user_version = 1")
    # A column of that name makes the step fail half-way (after its first statement).
    db.execute("ALTER TABLE versions ADD COLUMN current_cost INTEGER")
    db.close()
    with pytest.raises(AiosError, match="duplicate column name: current_cost"):
        UserStore(path, UID, "normal", Limits(1 << 30, 1 << 20, 4)).open()
    assert user_version(path) == 1
    db = sqlite3.connect(path)
    try:
        columns = [r[1] for r in db.execute("PRAGMA table_xinfo(versions)")]
        assert "cost" not in columns
        assert db.execute("SELECT bytes FROM usage").fetchone()[0] == 11 + 8 + 12 + 3
    finally:
        db.close()


def write_unparseable(path: Path, version: int) -> None:
    """A WAL-mode file at ``version`` whose schema this SQLite cannot parse, as a newer
    SQLite's syntax would be."""
    path.parent.mkdir(parents=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(
        f"CREATE TABLE future(x); INSERT INTO future VALUES (1); PRAGMA user_version = {version};"
    )
    db.execute("PRAGMA writable_schema = ON")
    db.execute("UPDATE sqlite_master SET sql = 'CREATE TABLE future(x, ' WHERE name = 'future'")
    db.close()


def test_a_newer_file_this_sqlite_cannot_parse_is_refused_before_any_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "storage"
    path = directory / f"{UID}.sqlite"
    newer = len(MIGRATIONS) + 1
    write_unparseable(path, newer)
    before = path.read_bytes()
    opens: list[bool] = []
    real_open = UserStore.open

    def recorded_open(store: UserStore, check: bool = True) -> None:
        opens.append(check)
        real_open(store, check)

    monkeypatch.setattr(UserStore, "open", recorded_open)

    async def main() -> None:
        m = manager(tmp_path)
        try:
            for _ in range(3):
                with pytest.raises(AiosError, match=f"newer aiosd \\(schema version {newer};"):
                    await m.run(UID, lambda s: s.usage())
        finally:
            await m.close()

    with caplog.at_level(logging.ERROR, logger="aiosd.managers.storage"):
        asyncio.run(main())
    assert opens == [True]  # the refusal holds for the run: the file is not looked at again
    assert [p.name for p in directory.iterdir() if ".corrupt-" in p.name] == []
    assert path.read_bytes() == before
    # SQLite's readers of a WAL file make its -wal and -shm; nothing is written to the -wal.
    wal = directory / f"{UID}.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    assert [r.getMessage().count(f"schema version {newer}") for r in caplog.records] == [1]


def test_a_current_file_with_a_damaged_schema_is_moved_aside(tmp_path: Path) -> None:
    directory = tmp_path / "storage"
    path = directory / f"{UID}.sqlite"
    write_unparseable(path, len(MIGRATIONS))
    before = path.read_bytes()

    async def main() -> None:
        m = manager(tmp_path)
        try:
            with pytest.raises(AiosError, match="was found damaged"):
                await m.run(UID, lambda s: s.usage(), tell=True)
            assert (await m.run(UID, lambda s: s.usage(), tell=True))["used_entries"] == 0
        finally:
            await m.close()

    asyncio.run(main())
    aside = [p for p in directory.iterdir() if p.name.startswith(f"{UID}.sqlite.corrupt-")]
    assert [p.read_bytes() for p in aside if not p.name.endswith(("-wal", "-shm"))] == [before]

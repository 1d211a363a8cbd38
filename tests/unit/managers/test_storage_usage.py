"""The usage counters the quotas read stay equal to a full recount through every write."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from aiosd.managers.storage import RECOUNT_BYTES, SCHEMA, Limits, UserStore


def _recount(store: UserStore) -> tuple[int, int]:
    assert store.db is not None
    b = store.db.execute(f"SELECT {RECOUNT_BYTES}").fetchone()[0]
    e = store.db.execute("SELECT COUNT(*) FROM heads").fetchone()[0]
    return b, e


def test_counters_follow_puts_prunes_deletes_purges_rollbacks_and_shares(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "0.sqlite", 0, "normal", Limits(1 << 30, 1 << 20, 3))
    store.open()
    for i in range(7):  # retention 3: prunes
        store.put("c", "a", b"x" * (10 + i), True, {"i": i})
    store.put("c", "b", b"yy", True, {})
    store.delete("c", "b")
    store.rollback("c", "b", 1, None)
    store.put("c", "d", b"z" * 50, False, {"bin": True})
    store.purge("c", "d")
    store.put("c", "e", b"e", True, {})
    store.share("c", 4242, "read")
    store.share("c", 4242, "read")  # the same share again
    store.share("other", 4243, "read")
    store.unshare("other", 4243)
    use = store.usage()
    assert (use["used_bytes"], use["used_entries"]) == _recount(store)
    assert use["used_entries"] == 3  # a, b (restored), e
    store.close()


def test_a_file_written_before_the_counters_gets_them_from_a_recount(tmp_path: Path) -> None:
    path = tmp_path / "0.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    # The tables of before the counters: SCHEMA without them.
    db.executescript(SCHEMA.split("-- What the quotas count")[0])
    db.executescript(
        "INSERT INTO versions(id, collection, key, version, value, is_text, metadata, size, "
        "created) VALUES (1, 'c', 'k', 1, x'00ff', 0, '{\"a\": 1}', 2, 1.0), "
        "(2, 'c', 'k', 2, CAST('text' AS BLOB), 1, '{}', 4, 2.0); "
        "INSERT INTO heads VALUES ('c', 'k', 2); "
        "INSERT INTO shares VALUES ('c', 7, 'read'); "
        "PRAGMA user_version = 0;"
    )
    db.close()
    store = UserStore(path, 0, "normal", Limits(1 << 30, 1 << 20, 3))
    store.open()
    try:
        use = store.usage()
        assert (use["used_bytes"], use["used_entries"]) == _recount(store)
        assert use["used_entries"] == 1 and use["used_bytes"] > 2 + 4
    finally:
        store.close()

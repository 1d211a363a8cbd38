"""The usage counters the quotas read stay equal to a full recount through every write."""

from __future__ import annotations

from pathlib import Path

from aiosd.managers.storage import Limits, UserStore


def _recount(store: UserStore) -> tuple[int, int]:
    assert store.db is not None
    b = store.db.execute("SELECT COALESCE(SUM(size), 0) FROM versions").fetchone()[0]
    e = store.db.execute("SELECT COUNT(*) FROM heads").fetchone()[0]
    return b, e


def test_counters_follow_puts_prunes_deletes_purges_and_rollbacks(tmp_path: Path) -> None:
    store = UserStore(tmp_path / "0.sqlite", 0, "normal", Limits(1 << 30, 1 << 20, 3))
    store.open()
    for i in range(7):  # retention 3: prunes
        store.put("c", "a", b"x" * (10 + i), True, {})
    store.put("c", "b", b"yy", True, {})
    store.delete("c", "b")
    store.rollback("c", "b", 1, None)
    store.put("c", "d", b"z" * 50, False, {})
    store.purge("c", "d")
    store.put("c", "e", b"e", True, {})
    use = store.usage()
    assert (use["used_bytes"], use["used_entries"]) == _recount(store)
    assert use["used_entries"] == 3  # a, b (restored), e
    store.close()
    # A database written before the counters (and before schema versions: user_version 0)
    # gets them from a recount at open.
    again = UserStore(tmp_path / "0.sqlite", 0, "normal", Limits(1 << 30, 1 << 20, 3))
    again.open()
    assert again.db is not None
    again.db.execute("DROP TABLE usage")
    again.db.execute("PRAGMA user_version = 0")
    again.close()
    again.open()
    use = again.usage()
    assert (use["used_bytes"], use["used_entries"]) == _recount(again)

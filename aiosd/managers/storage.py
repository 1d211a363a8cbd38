"""Storage manager: long-term, per-user, versioned, searchable data on SQLite.

Layout: one database per uid, ``<state>/storage/<uid>.sqlite``.  A user's data can only be
reached through that user's file, so no query can cross users by mistake; a quota is the
file's own accounting; a damaged file affects one user; deleting or backing up a user is one
file.  Sharing opens the owner's file for reading after checking its ``shares`` table.

Every store runs in its own thread (SQLite connections stay in the thread that made them), so
SQLite never blocks the event loop.  Writes commit before the reply: in WAL mode an
acknowledged write survives the daemon being killed; ``durability = "full"`` also syncs the
WAL at every commit, which survives power loss.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiosd.errors import InvalidParams, NotFound, QuotaExceeded, ShuttingDown

log = logging.getLogger(__name__)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions(
    id INTEGER PRIMARY KEY,
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    value BLOB,
    is_text INTEGER NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    UNIQUE(collection, key, version)
);
CREATE TABLE IF NOT EXISTS heads(
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    version_id INTEGER NOT NULL,
    PRIMARY KEY(collection, key)
) WITHOUT ROWID;
CREATE VIRTUAL TABLE IF NOT EXISTS search USING fts5(
    collection UNINDEXED, key UNINDEXED, body, meta, tokenize = 'unicode61'
);
CREATE TABLE IF NOT EXISTS shares(
    collection TEXT NOT NULL,
    gid INTEGER NOT NULL,
    mode TEXT NOT NULL,
    PRIMARY KEY(collection, gid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS settings(name TEXT PRIMARY KEY, value) WITHOUT ROWID;
-- What the quotas count, kept current by triggers in the writing transaction itself, so a
-- quota check costs one row read instead of a scan of every version.
CREATE TABLE IF NOT EXISTS usage(
    id INTEGER PRIMARY KEY CHECK (id = 1),
    bytes INTEGER NOT NULL,
    entries INTEGER NOT NULL
);
INSERT OR IGNORE INTO usage(id, bytes, entries)
    SELECT 1, COALESCE((SELECT SUM(size) FROM versions), 0), (SELECT COUNT(*) FROM heads);
CREATE TRIGGER IF NOT EXISTS usage_version_added AFTER INSERT ON versions
    BEGIN UPDATE usage SET bytes = bytes + NEW.size WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS usage_version_removed AFTER DELETE ON versions
    BEGIN UPDATE usage SET bytes = bytes - OLD.size WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS usage_key_added AFTER INSERT ON heads
    BEGIN UPDATE usage SET entries = entries + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS usage_key_removed AFTER DELETE ON heads
    BEGIN UPDATE usage SET entries = entries - 1 WHERE id = 1; END;
"""


@dataclass(frozen=True)
class Limits:
    """What one user may store."""

    quota_bytes: int
    quota_entries: int
    retention: int


def _meta_text(metadata: dict[str, Any]) -> str:
    """Metadata as searchable text: keys and values."""
    parts: list[str] = []
    for k, v in metadata.items():
        parts.append(str(k))
        parts.append(v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
    return " ".join(parts)


def fts_query(text: str) -> str:
    """A user's words as a safe FTS5 query: every word must match (quoted, so no syntax)."""
    words = [w for w in text.split() if w]
    if not words:
        raise InvalidParams("invalid params: query: needs at least one word")
    return " ".join('"' + w.replace('"', '""') + '"' for w in words)


class UserStore:
    """One user's database.  Every method runs in the store's own thread."""

    def __init__(self, path: Path, uid: int, durability: str, limits: Limits) -> None:
        self.path = path
        self.uid = uid
        self.limits = limits
        self.durability = durability
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"store-{uid}")
        self.db: sqlite3.Connection | None = None

    # --- opening --------------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating if needed) and check the database; move a damaged one aside."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists() and not self._healthy():
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.path) + suffix)
                if src.exists():
                    src.rename(Path(str(aside) + suffix))
            log.error(
                "storage of uid %d failed its integrity check: moved %s aside to %s and "
                "started an empty store; the old file is kept for recovery",
                self.uid,
                self.path,
                aside,
            )
        self.db = self._connect()
        self.db.executescript(SCHEMA)
        os.chmod(self.path, 0o600)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {'FULL' if self.durability == 'full' else 'NORMAL'}")
        db.execute("PRAGMA busy_timeout = 5000")
        return db

    def _healthy(self) -> bool:
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
            try:
                rows = db.execute("PRAGMA quick_check").fetchall()
            finally:
                db.close()
        except sqlite3.DatabaseError:
            return False
        return rows == [("ok",)]

    def close(self) -> None:
        """Close the database (in the store's thread)."""
        if self.db is not None:
            self.db.close()
            self.db = None

    # --- helpers --------------------------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        assert self.db is not None
        return self.db

    def _head(self, collection: str, key: str) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self._db.execute(
            "SELECT v.id, v.version, v.value, v.is_text, v.metadata, v.size, v.created "
            "FROM heads h JOIN versions v ON v.id = h.version_id "
            "WHERE h.collection = ? AND h.key = ?",
            (collection, key),
        ).fetchone()
        return row

    def _head_id(self, collection: str, key: str) -> int | None:
        """The id of the key's current version (its row in ``versions``), if it is live."""
        row = self._db.execute(
            "SELECT version_id FROM heads WHERE collection = ? AND key = ?", (collection, key)
        ).fetchone()
        return None if row is None else int(row[0])

    def _next_version(self, collection: str, key: str) -> int:
        """The number the key's next version gets (deleted versions count too)."""
        last: int = self._db.execute(
            "SELECT COALESCE(MAX(version), 0) FROM versions WHERE collection = ? AND key = ?",
            (collection, key),
        ).fetchone()[0]
        return last + 1

    def usage(self) -> dict[str, int]:
        """Bytes (all versions kept) and entries (live keys) in use, with the quotas."""
        used_bytes, used_entries = self._db.execute(
            "SELECT bytes, entries FROM usage WHERE id = 1"
        ).fetchone()
        quota_bytes, quota_entries = self._quotas()
        return {
            "used_bytes": used_bytes,
            "used_entries": used_entries,
            "quota_bytes": quota_bytes,
            "quota_entries": quota_entries,
        }

    def _quotas(self) -> tuple[int, int]:
        rows = dict(
            self._db.execute(
                "SELECT name, value FROM settings WHERE name IN ('quota_bytes', 'quota_entries')"
            ).fetchall()
        )
        return (
            int(rows.get("quota_bytes", self.limits.quota_bytes)),
            int(rows.get("quota_entries", self.limits.quota_entries)),
        )

    def set_quota(self, quota_bytes: int | None, quota_entries: int | None) -> dict[str, int]:
        """Set this user's quotas (admins only; checked by the caller)."""
        with self._tx():
            for name, value in (("quota_bytes", quota_bytes), ("quota_entries", quota_entries)):
                if value is not None:
                    self._db.execute(
                        "INSERT INTO settings(name, value) VALUES (?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                        (name, value),
                    )
        return self.usage()

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    # --- operations -----------------------------------------------------------------------

    def put(
        self, collection: str, key: str, value: bytes, is_text: bool, metadata: dict[str, Any]
    ) -> dict[str, Any]:
        """Store a new version; refuse (changing nothing) if it would exceed a quota."""
        size = len(value)
        now = time.time()
        with self._tx():
            head = self._head_id(collection, key)
            version = self._next_version(collection, key)
            pruned = self._db.execute(
                "SELECT id, size FROM versions WHERE collection = ? AND key = ? "
                "ORDER BY version DESC LIMIT -1 OFFSET ?",
                (collection, key, self.limits.retention - 1),
            ).fetchall()
            use = self.usage()
            new_bytes = use["used_bytes"] + size - sum(s for _, s in pruned)
            new_entries = use["used_entries"] + (0 if head is not None else 1)
            if new_bytes > use["quota_bytes"] or new_entries > use["quota_entries"]:
                what = "bytes" if new_bytes > use["quota_bytes"] else "entries"
                raise QuotaExceeded(
                    f"storage quota exceeded: this write needs {new_bytes} bytes and "
                    f"{new_entries} entries; the quota is {use['quota_bytes']} bytes and "
                    f"{use['quota_entries']} entries (in use: {use['used_bytes']} bytes, "
                    f"{use['used_entries']} entries)",
                    data={
                        **use,
                        "needed_bytes": new_bytes,
                        "needed_entries": new_entries,
                        "exceeded": what,
                    },
                )
            meta_json = json.dumps(metadata, ensure_ascii=False, sort_keys=True)
            cur = self._db.execute(
                "INSERT INTO versions(collection, key, version, value, is_text, metadata, size, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (collection, key, version, value, int(is_text), meta_json, size, now),
            )
            new_id = cur.lastrowid
            if head is not None:
                self._db.execute("DELETE FROM search WHERE rowid = ?", (head,))
            self._db.execute(
                "INSERT INTO heads(collection, key, version_id) VALUES (?, ?, ?) "
                "ON CONFLICT(collection, key) DO UPDATE SET version_id = excluded.version_id",
                (collection, key, new_id),
            )
            body = value.decode("utf-8", "replace") if is_text else ""
            self._db.execute(
                "INSERT INTO search(rowid, collection, key, body, meta) VALUES (?, ?, ?, ?, ?)",
                (new_id, collection, key, body, _meta_text(metadata)),
            )
            if pruned:
                self._db.executemany("DELETE FROM versions WHERE id = ?", [(i,) for i, _ in pruned])
        return {
            "collection": collection,
            "key": key,
            "version": version,
            "size": size,
            "created": now,
        }

    def get(self, collection: str, key: str, version: int | None) -> dict[str, Any]:
        """The current value, or a given version."""
        if version is None:
            row = self._head(collection, key)
        else:
            row = self._db.execute(
                "SELECT id, version, value, is_text, metadata, size, created FROM versions "
                "WHERE collection = ? AND key = ? AND version = ? AND deleted = 0",
                (collection, key, version),
            ).fetchone()
        if row is None:
            raise _not_found(collection, key, version)
        _, ver, value, is_text, meta, size, created = row
        return {
            "collection": collection,
            "key": key,
            "version": ver,
            "value": value,
            "is_text": bool(is_text),
            "metadata": json.loads(meta),
            "size": size,
            "created": created,
        }

    def list_keys(
        self, collection: str, prefix: str, limit: int, after: str | None
    ) -> dict[str, Any]:
        """Live keys of a collection in key order, ``limit`` at a time after ``after``."""
        # Prefix as a range, so keys with LIKE/GLOB metacharacters need no escaping.
        hi = prefix + "\U0010ffff"
        rows = self._db.execute(
            "SELECT h.key, v.version, v.size, v.created FROM heads h "
            "JOIN versions v ON v.id = h.version_id "
            "WHERE h.collection = ? AND h.key >= ? AND h.key < ? AND h.key > ? "
            "ORDER BY h.key LIMIT ?",
            (collection, prefix, hi, after or "", limit + 1),
        ).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "entries": [{"key": k, "version": v, "size": s, "updated": c} for k, v, s, c in rows],
            "next": rows[-1][0] if more else None,
        }

    def collections(self) -> list[str]:
        """Names of the collections that hold live keys."""
        return [
            r[0]
            for r in self._db.execute("SELECT DISTINCT collection FROM heads ORDER BY collection")
        ]

    def delete(self, collection: str, key: str) -> dict[str, Any]:
        """Remove a key; its history stays (a rollback brings it back)."""
        with self._tx():
            head = self._head_id(collection, key)
            if head is None:
                raise _not_found(collection, key, None)
            version = self._next_version(collection, key)
            self._db.execute(
                "INSERT INTO versions(collection, key, version, value, is_text, metadata, size, "
                "created, deleted) VALUES (?, ?, ?, NULL, 0, '{}', 0, ?, 1)",
                (collection, key, version, time.time()),
            )
            self._db.execute("DELETE FROM search WHERE rowid = ?", (head,))
            self._db.execute(
                "DELETE FROM heads WHERE collection = ? AND key = ?", (collection, key)
            )
        return {"collection": collection, "key": key, "version": version, "deleted": True}

    def purge(self, collection: str, key: str) -> None:
        """Remove a key and every version of it (the daemon's own collections: forgotten
        memory must not linger in history)."""
        with self._tx():
            head = self._head_id(collection, key)
            cur = self._db.execute(
                "DELETE FROM versions WHERE collection = ? AND key = ?", (collection, key)
            )
            if cur.rowcount == 0:
                raise _not_found(collection, key, None)
            if head is not None:
                self._db.execute("DELETE FROM search WHERE rowid = ?", (head,))
            self._db.execute(
                "DELETE FROM heads WHERE collection = ? AND key = ?", (collection, key)
            )

    def history(self, collection: str, key: str) -> dict[str, Any]:
        """Every version kept, oldest first."""
        rows = self._db.execute(
            "SELECT version, size, created, deleted FROM versions "
            "WHERE collection = ? AND key = ? ORDER BY version",
            (collection, key),
        ).fetchall()
        if not rows:
            raise _not_found(collection, key, None)
        return {
            "collection": collection,
            "key": key,
            "versions": [
                {"version": v, "size": s, "created": c, "deleted": bool(d)} for v, s, c, d in rows
            ],
        }

    def rollback(
        self, collection: str, key: str, version: int | None, at: float | None
    ) -> dict[str, Any]:
        """Make an old version current again, as a new version (nothing is lost)."""
        if version is None:
            row = self._db.execute(
                "SELECT version, deleted FROM versions "
                "WHERE collection = ? AND key = ? AND created <= ? "
                "ORDER BY version DESC LIMIT 1",
                (collection, key, at),
            ).fetchone()
            if row is None:
                raise NotFound(f"{collection}/{key} has no version at or before {at}")
            version = int(row[0])
            if row[1]:
                raise NotFound(f"{collection}/{key} was deleted at that time (version {version})")
        old = self.get(collection, key, version)
        out = self.put(collection, key, old["value"], old["is_text"], old["metadata"])
        return {**out, "from_version": version}

    def search(
        self,
        query: str,
        collections: list[str],
        metadata: dict[str, Any],
        limit: int,
        offset: int,
    ) -> list[dict[str, Any]]:
        """BM25-ranked full-text search over text values and metadata."""
        sql = (
            "SELECT s.collection, s.key, v.version, bm25(search) AS score, "
            "snippet(search, 2, '[', ']', '…', 12) FROM search s "
            "JOIN versions v ON v.id = s.rowid WHERE search MATCH ? "
            f"AND s.collection IN ({','.join('?' * len(collections))})"
        )
        args: list[Any] = [fts_query(query), *collections]
        for k, v in metadata.items():
            sql += " AND json_extract(v.metadata, ?) = ?"
            args.extend([f'$."{k}"', v])
        sql += " ORDER BY score LIMIT ? OFFSET ?"
        args.extend([limit, offset])
        try:
            rows = self._db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            raise InvalidParams(f"invalid params: query: {exc}") from None
        return [
            {"collection": c, "key": k, "version": ver, "score": round(-score, 6), "snippet": snip}
            for c, k, ver, score, snip in rows
        ]

    def share(self, collection: str, gid: int, mode: str) -> None:
        """Let members of ``gid`` read ``collection``."""
        with self._tx():
            self._db.execute(
                "INSERT INTO shares(collection, gid, mode) VALUES (?, ?, ?) "
                "ON CONFLICT(collection, gid) DO UPDATE SET mode = excluded.mode",
                (collection, gid, mode),
            )

    def unshare(self, collection: str, gid: int) -> bool:
        """Revoke a share; True if there was one."""
        with self._tx():
            cur = self._db.execute(
                "DELETE FROM shares WHERE collection = ? AND gid = ?", (collection, gid)
            )
        return cur.rowcount > 0

    def shared_with(self, collection: str, gids: frozenset[int]) -> bool:
        """Whether any of ``gids`` may read ``collection``."""
        if not gids:
            return False
        row = self._db.execute(
            f"SELECT 1 FROM shares WHERE collection = ? AND gid IN ({','.join('?' * len(gids))})",
            (collection, *gids),
        ).fetchone()
        return row is not None

    def shares(self) -> list[dict[str, Any]]:
        """Every share of this user's collections."""
        return [
            {"collection": c, "gid": g, "mode": m}
            for c, g, m in self._db.execute(
                "SELECT collection, gid, mode FROM shares ORDER BY 1, 2"
            )
        ]

    def integrity(self) -> str:
        """PRAGMA integrity_check's answer."""
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any error (nothing half-written)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _not_found(collection: str, key: str, version: int | None) -> NotFound:
    what = f"{collection}/{key}" + (f" version {version}" if version is not None else "")
    return NotFound(f"no entry {what}")


class StorageManager:
    """Opens each user's store on first use and runs its work in the store's thread."""

    def __init__(self, directory: Path, durability: str, limits: Limits) -> None:
        self.directory = directory
        self.durability = durability
        self.limits = limits
        self._stores: dict[int, UserStore] = {}
        self._closed = False

    async def run(self, uid: int, fn: Callable[[UserStore], T]) -> T:
        """Run ``fn(store)`` in ``uid``'s store thread, opening the store if needed."""
        if self._closed:
            raise ShuttingDown("storage is closed: the daemon is stopping")
        store = self._stores.get(uid)
        if store is None:
            store = UserStore(self.directory / f"{uid}.sqlite", uid, self.durability, self.limits)
            try:
                await asyncio.get_running_loop().run_in_executor(store.executor, store.open)
            except BaseException:
                store.executor.shutdown(wait=False)
                raise
            # Another call may have opened it meanwhile: keep the first, drop ours.
            if uid in self._stores:
                store.executor.submit(store.close)
                store.executor.shutdown(wait=False)
                store = self._stores[uid]
            else:
                self._stores[uid] = store
        return await asyncio.get_running_loop().run_in_executor(store.executor, fn, store)

    def exists(self, uid: int) -> bool:
        """Whether ``uid`` has a store at all (without creating one)."""
        return uid in self._stores or (self.directory / f"{uid}.sqlite").exists()

    async def run_existing(self, uid: int, fn: Callable[[UserStore], T], default: T) -> T:
        """:meth:`run` if ``uid`` has a store, else ``default`` (no store is created)."""
        if not self.exists(uid):
            return default
        return await self.run(uid, fn)

    async def close(self) -> None:
        """Close every store and stop its thread."""
        self._closed = True
        loop = asyncio.get_running_loop()
        for store in list(self._stores.values()):
            await loop.run_in_executor(store.executor, store.close)
            store.executor.shutdown(wait=True)
        self._stores.clear()

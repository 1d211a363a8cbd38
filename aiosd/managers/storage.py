"""Storage manager: long-term, per-user, versioned, searchable data on SQLite.

Layout: one database per uid, ``<state>/storage/<uid>.sqlite``.  A user's data can only be
reached through that user's file, so no query can cross users by mistake; a quota is the
file's own accounting; a damaged file affects one user; deleting or backing up a user is one
file.  Sharing opens the owner's file for reading after checking its ``shares`` table.

Stores run on a bounded pool of worker threads, so SQLite never blocks the event loop; each
store's connection is used by one thread at a time (its jobs queue up), and at most
``max_open_stores`` stores are open at once (the least recently used idle one is closed to
make room).  Writes commit before the reply: in WAL mode an acknowledged write survives the
daemon being killed; ``durability = "full"`` also syncs the WAL at every commit, which
survives power loss.

A file records its schema version in ``PRAGMA user_version``; :data:`MIGRATIONS` bring an
older file up to date, one transaction each, and a newer file is refused untouched.  Only a
file SQLite finds damaged (or an empty one) is moved aside and replaced by an empty store,
and its user's own next call is told so; any other failure to open (a lock, no file
descriptor left, an I/O error) leaves the file in place.  A store that fails while in use
(damaged, I/O error) is closed; the next call reopens and checks it, without a restart.

The quotas count every byte a user's data takes (:data:`SCHEMA_2`); the quotas an
administrator sets, and the news of damage not yet told, are kept in the daemon's own
:class:`Ledger`, not in the users' files.  Every file is 0600 and every directory 0700,
whatever the umask.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, TypeVar

from aiosd.errors import AiosError, InvalidParams, NotFound, QuotaExceeded, ShuttingDown

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

#: Bytes a version costs beyond what it holds: its row and its entry in the index of rows.
VERSION_OVERHEAD = 64
#: Bytes the current version of a key costs beyond what it holds: the key's row among the
#: live keys, its row in the search index.
CURRENT_OVERHEAD = 32
#: Bytes a share costs beyond its collection's name.
SHARE_OVERHEAD = 32
#: SQLite's page size (its default, which aiosd never changes), and about how many bytes of
#: names an index entry keeps on its own page before the rest spills into pages of its own.
PAGE = 4096
INDEX_LOCAL = 990

#: A version's collection and key names, in bytes.
_NAMES = "(length(CAST(collection AS BLOB)) + length(CAST(key AS BLOB)))"
#: What the names take in an index: themselves, and a name too long for an index page's
#: share (about 1000 bytes with SQLite's 4096-byte pages) spills into pages of its own.
_INDEXED_NAMES = (
    f"({_NAMES} + CASE WHEN {_NAMES} > {INDEX_LOCAL} "
    f"THEN {PAGE} * (({_NAMES} - {INDEX_LOCAL} + {PAGE - 5}) / {PAGE - 4}) ELSE 0 END)"
)

#: Schema version 2: the bytes quota counts everything a user's data takes, not only values.
#: Every kept version (deletion markers included) costs its value, its serialized metadata
#: and its collection and key names twice (its row and the index that finds it); the current
#: version of a key costs, while it is current, its text and metadata twice more (the search
#: index keeps a copy, and its word index can take as much again) and its names twice (the
#: search row, the live key's row, which is an index too).  Shares cost their collection's
#: name.
#: The costs are generated columns, so the triggers, the recount and a migrated file all use
#: this one definition; a missing version makes a trigger's sum NULL, which the NOT NULL
#: counter refuses (the write fails) rather than letting the count drift.
SCHEMA_2 = f"""
ALTER TABLE versions ADD COLUMN cost INTEGER GENERATED ALWAYS AS (
    COALESCE(length(CAST(value AS BLOB)), 0) + length(CAST(metadata AS BLOB))
    + {_NAMES} + {_INDEXED_NAMES} + {VERSION_OVERHEAD}
) VIRTUAL;
ALTER TABLE versions ADD COLUMN current_cost INTEGER GENERATED ALWAYS AS (
    2 * (CASE WHEN is_text THEN COALESCE(length(CAST(value AS BLOB)), 0) ELSE 0 END
         + length(CAST(metadata AS BLOB)))
    + {_NAMES} + {_INDEXED_NAMES} + {CURRENT_OVERHEAD}
) VIRTUAL;
DROP TRIGGER IF EXISTS usage_version_added;
DROP TRIGGER IF EXISTS usage_version_removed;
DROP TRIGGER IF EXISTS usage_key_added;
DROP TRIGGER IF EXISTS usage_key_removed;
CREATE TRIGGER usage_version_added AFTER INSERT ON versions
    BEGIN UPDATE usage SET bytes = bytes + NEW.cost WHERE id = 1; END;
CREATE TRIGGER usage_version_removed AFTER DELETE ON versions
    BEGIN UPDATE usage SET bytes = bytes - OLD.cost WHERE id = 1; END;
CREATE TRIGGER usage_key_added AFTER INSERT ON heads BEGIN
    UPDATE usage SET entries = entries + 1,
        bytes = bytes + (SELECT current_cost FROM versions WHERE id = NEW.version_id)
    WHERE id = 1;
END;
CREATE TRIGGER usage_key_moved AFTER UPDATE OF version_id ON heads BEGIN
    UPDATE usage SET
        bytes = bytes - (SELECT current_cost FROM versions WHERE id = OLD.version_id)
            + (SELECT current_cost FROM versions WHERE id = NEW.version_id)
    WHERE id = 1;
END;
CREATE TRIGGER usage_key_removed AFTER DELETE ON heads BEGIN
    UPDATE usage SET entries = entries - 1,
        bytes = bytes - (SELECT current_cost FROM versions WHERE id = OLD.version_id)
    WHERE id = 1;
END;
CREATE TRIGGER usage_share_added AFTER INSERT ON shares BEGIN
    UPDATE usage SET bytes = bytes + length(CAST(NEW.collection AS BLOB)) + {SHARE_OVERHEAD}
    WHERE id = 1;
END;
CREATE TRIGGER usage_share_removed AFTER DELETE ON shares BEGIN
    UPDATE usage SET bytes = bytes - length(CAST(OLD.collection AS BLOB)) - {SHARE_OVERHEAD}
    WHERE id = 1;
END;
"""

#: Every byte the quota counts, summed over the tables (what the counters must equal).
RECOUNT_BYTES = f"""
    (SELECT COALESCE(SUM(cost), 0) FROM versions)
    + (SELECT COALESCE(SUM(v.current_cost), 0) FROM heads h JOIN versions v ON v.id = h.version_id)
    + (SELECT COALESCE(SUM(length(CAST(collection AS BLOB)) + {SHARE_OVERHEAD}), 0) FROM shares)
"""

#: Schema migrations in order: entry ``n - 1`` takes a file from version ``n - 1`` to ``n``.
#: Version 0 is a new file or one written before versions were stamped; SCHEMA's
#: ``IF NOT EXISTS`` leaves such a file's tables as they are (and adds what an older build
#: lacked, such as the usage counters), so it becomes version 1 with its data unchanged.
#: Version 2 counts every byte (:data:`SCHEMA_2`) and recounts what the file holds.
MIGRATIONS: tuple[str, ...] = (
    SCHEMA,
    SCHEMA_2 + f"UPDATE usage SET bytes = {RECOUNT_BYTES}, entries = (SELECT COUNT(*) FROM heads) "
    "WHERE id = 1;",
)

#: The daemon's own database beside the users' (:class:`Ledger`): the quotas administrators
#: set, and the damage each user has yet to be told of, which must not live in the users'
#: files, where a damaged or lost file would take them along.
LEDGER_FILE = "ledger.sqlite"
LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS quotas(
    uid INTEGER PRIMARY KEY,
    quota_bytes INTEGER,
    quota_entries INTEGER
);
CREATE TABLE IF NOT EXISTS notices(
    id INTEGER PRIMARY KEY,
    uid INTEGER NOT NULL,
    created REAL NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS notices_of_uid ON notices(uid);
"""
#: Names of the quotas older files kept in their own ``settings`` table.
_QUOTA_SETTINGS = ("quota_bytes", "quota_entries")

#: SQLite releases the GIL while it works and while it waits for the disk, so a few more
#: workers than CPUs keep both busy (the standard library's default for I/O-bound pools).
WORKERS = min(32, (os.cpu_count() or 1) + 4)
#: Jobs of one store a worker runs in a row before it goes back to the end of the pool's
#: queue, so one user's backlog cannot keep the workers from the others.
BATCH = 8
#: How long a connection waits for another's lock on the file before it fails (seconds).
BUSY_TIMEOUT = 5.0


class Usage(TypedDict):
    """Bytes (all versions kept) and entries (live keys) in use, with the quotas."""

    used_bytes: int
    used_entries: int
    quota_bytes: int
    quota_entries: int


class Written(TypedDict):
    """The version a put made."""

    collection: str
    key: str
    version: int
    size: int
    created: float


class RolledBack(Written):
    """The version a rollback made, and the version it copied."""

    from_version: int


class StoredValue(TypedDict):
    """One version's value (bytes, text if ``is_text``) and metadata."""

    collection: str
    key: str
    version: int
    value: bytes
    is_text: bool
    metadata: dict[str, Any]
    size: int
    created: float


class KeyInfo(TypedDict):
    """One live key of a listing; ``updated`` is when its current version was made."""

    key: str
    version: int
    size: int
    updated: float


class KeyPage(TypedDict):
    """A page of keys; ``next`` is the ``after`` of the next page (None: the last page)."""

    entries: list[KeyInfo]
    next: str | None


class Deletion(TypedDict):
    """The deletion marker a delete made (always ``deleted``)."""

    collection: str
    key: str
    version: int
    deleted: bool


class VersionRecord(TypedDict):
    """One kept version of a key (``deleted``: a deletion marker)."""

    version: int
    size: int
    created: float
    deleted: bool


class KeyHistory(TypedDict):
    """Every kept version of a key, oldest first."""

    collection: str
    key: str
    versions: list[VersionRecord]


class SearchHit(TypedDict):
    """One search hit; a higher score is a better match."""

    collection: str
    key: str
    version: int
    score: float
    snippet: str


class ShareGrant(TypedDict):
    """One collection shared with one group."""

    collection: str
    gid: int
    mode: str


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


def _damaged(exc: sqlite3.Error) -> bool:
    """Whether SQLite says the file is damaged or not a database (not merely unreadable now)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _failing(exc: sqlite3.Error) -> bool:
    """Whether an error of a store in use says its file cannot be trusted until reopened:
    damaged, not a database, or an I/O error (the connection may hold a half-read state)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(exc, sqlite3.DatabaseError) and (
        _damaged(exc) or (code is not None and code & 0xFF == sqlite3.SQLITE_IOERR)
    )


# --- files --------------------------------------------------------------------------------------


def private_directory(directory: Path) -> None:
    """Make ``directory`` mode 0700, creating it and any missing parent that way, whatever the
    umask (``mkdir``'s mode is masked by it)."""
    missing: list[Path] = []
    d = directory
    while not d.exists():
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
        os.chmod(d, 0o700)
    if stat.S_IMODE(directory.stat().st_mode) != 0o700:
        os.chmod(directory, 0o700)


def _private_files(path: Path) -> None:
    """Make the database ``path`` and whatever SQLite keeps beside it mode 0600.

    SQLite makes a ``-wal``, ``-shm`` or ``-journal`` with the main file's mode, so a main file
    that is 0600 keeps them private; these are the files an older run may have left looser.
    """
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode) != 0o600:
                os.chmod(f"{path}{suffix}", 0o600)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_database(path: Path, build: Callable[[sqlite3.Connection], object]) -> None:
    """Make the database ``path``, mode 0600, with ``build`` run in it: all or nothing.

    It is built under another name and renamed into place, so ``path`` is either absent or a
    whole database: never an empty or half-made file that a later open would have to take
    for a new one or for damage.
    """
    tmp = path.with_name(path.name + ".new")
    for suffix in ("", "-journal"):  # what a run that died here left
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    try:
        # Created 0600 before SQLite opens it: SQLite gives its journal the same mode.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        db = sqlite3.connect(tmp, isolation_level=None, timeout=BUSY_TIMEOUT)
        try:
            db.execute("PRAGMA synchronous = FULL")
            build(db)
        finally:
            db.close()
        os.rename(tmp, path)
        _fsync_directory(path.parent)
    except BaseException:
        for suffix in ("", "-journal"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        raise


QuotaPair = tuple[int | None, int | None]


class Ledger:
    """The daemon's own records of the users' stores (:data:`LEDGER_FILE`): the quotas
    administrators set, and the damage a user has yet to be told of.

    Kept apart from the users' files, so a damaged or lost store takes neither along.  Used
    from the store threads under a lock.  The file is made when it first has something to
    keep; until then every user has the configured quotas.  A file that cannot be read fails
    the calls that need it and is left in place: quotas never silently fall back to defaults.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def quotas(self, uid: int) -> QuotaPair:
        """``uid``'s quotas (bytes, entries); None where the configured one applies."""
        row = self._query("SELECT quota_bytes, quota_entries FROM quotas WHERE uid = ?", uid)
        if not row:
            return (None, None)
        b, e = row[0]
        return (None if b is None else int(b), None if e is None else int(e))

    def set_quotas(self, uid: int, quota_bytes: int | None, quota_entries: int | None) -> QuotaPair:
        """Set ``uid``'s quotas (None: leave that one as it is); the quotas now."""
        old_bytes, old_entries = self.quotas(uid)
        new = (
            old_bytes if quota_bytes is None else quota_bytes,
            old_entries if quota_entries is None else quota_entries,
        )
        self._write(
            "INSERT INTO quotas(uid, quota_bytes, quota_entries) VALUES (?, ?, ?) "
            "ON CONFLICT(uid) DO UPDATE SET quota_bytes = excluded.quota_bytes, "
            "quota_entries = excluded.quota_entries",
            (uid, *new),
        )
        return new

    def adopt_quotas(self, uid: int, quota_bytes: int | None, quota_entries: int | None) -> None:
        """Keep quotas an older file held for ``uid``, unless the ledger has some already."""
        self._write(
            "INSERT OR IGNORE INTO quotas(uid, quota_bytes, quota_entries) VALUES (?, ?, ?)",
            (uid, quota_bytes, quota_entries),
        )

    def add_notice(self, uid: int, message: str) -> None:
        """Keep ``message`` for ``uid`` until :meth:`take_notices` hands it over."""
        self._write(
            "INSERT INTO notices(uid, created, message) VALUES (?, ?, ?)",
            (uid, time.time(), message),
        )

    def has_notices(self, uid: int) -> bool:
        """Whether ``uid`` has notices not yet handed over."""
        return bool(self._query("SELECT 1 FROM notices WHERE uid = ? LIMIT 1", uid))

    def take_notices(self, uid: int) -> list[str]:
        """``uid``'s notices, oldest first, removed from the ledger."""
        rows = self._query("SELECT id, message FROM notices WHERE uid = ? ORDER BY id", uid)
        if rows:
            self._write(
                f"DELETE FROM notices WHERE id IN ({','.join('?' * len(rows))})",
                tuple(r[0] for r in rows),
            )
        return [str(r[1]) for r in rows]

    def close(self) -> None:
        """Close the file (a later call opens it again)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _query(self, sql: str, uid: int) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                db = self._connection(create=False)
                return [] if db is None else db.execute(sql, (uid,)).fetchall()
            except (sqlite3.Error, OSError) as exc:
                raise self._failed(exc) from exc

    def _write(self, sql: str, args: tuple[Any, ...]) -> None:
        with self._lock:
            try:
                db = self._connection(create=True)
                assert db is not None
                db.execute(sql, args)
            except (sqlite3.Error, OSError) as exc:
                raise self._failed(exc) from exc

    def _connection(self, create: bool) -> sqlite3.Connection | None:
        if self._db is not None:
            return self._db
        if not self.path.exists():
            if not create:
                return None
            private_directory(self.path.parent)
            create_database(self.path, lambda db: db.executescript(LEDGER_SCHEMA))
        _private_files(self.path)
        if self.path.stat().st_size == 0:
            raise sqlite3.DatabaseError("the file is empty (0 bytes)")
        db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT
        )
        try:
            # Changes are rare: each is synced to disk before it is confirmed.
            db.execute("PRAGMA synchronous = FULL")
            db.executescript(LEDGER_SCHEMA)  # what an older ledger lacks
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _failed(self, exc: Exception) -> AiosError:
        # The connection may be in a bad state: the next call opens the file again.
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        log.error(
            "the storage ledger %s could not be used: %s; it is left in place for an administrator",
            self.path,
            exc,
        )
        return AiosError(
            f"the storage ledger (the quotas set by administrators) could not be used: {exc}; "
            "storage calls that need it fail until an administrator repairs it (it is left in "
            "place)"
        )


def _encodable(**texts: str) -> None:
    """Refuse text SQLite cannot store as UTF-8 (a lone surrogate), naming the field."""
    for name, text in texts.items():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidParams(
                f"invalid params: {name}: not valid Unicode text (a lone surrogate)"
            ) from None


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    row = db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,)).fetchone()
    return row is not None


def fts_query(text: str) -> str:
    """A user's words as a safe FTS5 query: every word must match (quoted, so no syntax)."""
    words = [w for w in text.split() if w]
    if not words:
        raise InvalidParams("invalid params: query: needs at least one word")
    return " ".join('"' + w.replace('"', '""') + '"' for w in words)


class UserStore:
    """One user's database; its connection is used by one thread at a time."""

    def __init__(
        self,
        path: Path,
        uid: int,
        durability: str,
        limits: Limits,
        ledger: Ledger | None = None,
    ) -> None:
        self.path = path
        self.uid = uid
        self.limits = limits
        self.durability = durability
        self.db: sqlite3.Connection | None = None
        #: The daemon's records of this store (the manager's, shared by every store).
        self.ledger = ledger if ledger is not None else Ledger(path.parent / LEDGER_FILE)
        self._own_ledger = ledger is None
        #: The quotas an administrator set for this user (None: the configured one).
        self.quotas: QuotaPair = (None, None)
        #: Why :meth:`open` refused the file (a newer schema), which stays so for this run.
        self.refused: AiosError | None = None
        #: Times the file failed as damaged while in use since it last passed a check: once
        #: makes the next open check it fully, twice moves it aside.
        self.failures = 0
        #: Where :meth:`open` moved the file aside (damaged), if it did.
        self.quarantined: Path | None = None
        #: Whether the ledger holds notices for this user (damage found) not yet told.
        self.untold = False

    # --- opening --------------------------------------------------------------------------

    def open(self, check: bool = True) -> None:
        """Open the database, creating and migrating it as needed.

        ``check``: run SQLite's quick check first.  A file found damaged (by the check, or by
        SQLite at any open), or empty, is moved aside and replaced by an empty store; what
        happened is kept in the ledger until the user is told (:meth:`take_notices`).
        """
        try:
            private_directory(self.path.parent)
            version = None
            if self.path.exists():
                _private_files(self.path)
                version = self._inspect(check)
            if version is None:
                create_database(self.path, lambda db: self._migrate(db, 0))
                version = len(MIGRATIONS)
            db = self._connect()
            try:
                self._migrate(db, version)
                self._adopt_quotas(db)
                self.quotas = self.ledger.quotas(self.uid)
                self.untold = self.ledger.has_notices(self.uid)
            except BaseException:
                db.close()
                raise
        except (sqlite3.Error, OSError) as exc:
            # A locked file, a lack of file descriptors or an I/O error says nothing about the
            # data: the file stays where it is, and a later request tries again.
            log.error(
                "storage of uid %d (%s) could not be opened: %s; the file is left in place",
                self.uid,
                self.path,
                exc,
            )
            raise AiosError(
                f"storage of uid {self.uid} could not be opened: {exc} (the file is left in "
                "place; the next request tries again)"
            ) from exc
        self.db = db

    def take_notices(self) -> str | None:
        """What the user has yet to be told (damage found and moved aside), now told."""
        if not self.untold:
            return None
        notices = self.ledger.take_notices(self.uid)
        self.untold = False
        return " ".join(notices) if notices else None

    def _connect(self) -> sqlite3.Connection:
        # Not bound to the opening thread: the store's job queue, not the thread, keeps one
        # user of the connection at a time, on whichever pool worker is free.
        db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT
        )
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {'FULL' if self.durability == 'full' else 'NORMAL'}")
        except BaseException:
            db.close()
            raise
        return db

    def _inspect(self, check: bool) -> int | None:
        """The schema version, read-only; refuses a newer one; moves an empty or damaged
        file aside (None); ``check``: look for damage first."""
        problem: str | None = None
        if self.path.stat().st_size == 0:
            # SQLite would take it for a new, empty database.
            problem = "the file is empty (0 bytes)"
        elif self.failures >= 2:
            problem = f"it failed as damaged {self.failures} times in a row while in use"
        else:
            try:
                # Before any check: a file this code must not use is left as it is
                # (quick_check cannot even parse the schema of some newer files).
                version = self._version()
                if version > len(MIGRATIONS):
                    raise self._refuse(version)
                if check or self.failures:
                    problem = self._check(thorough=self.failures > 0)
            except sqlite3.DatabaseError as exc:
                if not _damaged(exc):
                    raise
                problem = str(exc)
        if problem is None:
            return version
        self._quarantine(problem)
        return None

    def _version(self) -> int:
        """The file's ``user_version``, read through a read-only connection."""
        db = sqlite3.connect(
            self.path.absolute().as_uri() + "?mode=ro",
            uri=True,
            isolation_level=None,
            timeout=BUSY_TIMEOUT,
        )
        try:
            return int(db.execute("PRAGMA user_version").fetchone()[0])
        finally:
            db.close()

    def _check(self, thorough: bool) -> str | None:
        """What SQLite's check found wrong, or None if nothing.

        ``thorough`` (a file that failed while in use): ``integrity_check``, which also
        compares the indexes with their tables, and the search index's own check, instead of
        ``quick_check``.
        """
        # Read-write, as the connection proper will be: closing it as the last one removes
        # the empty -wal and -shm that reading a WAL file leaves.
        db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT)
        try:
            pragma = "integrity_check" if thorough else "quick_check"
            rows = db.execute(f"PRAGMA {pragma}").fetchall()
            if rows == [("ok",)] and thorough and _has_table(db, "search"):
                db.execute("INSERT INTO search(search) VALUES ('integrity-check')")
        finally:
            db.close()
        if rows == [("ok",)]:
            return None
        # A row may hold many findings, one a line: the first few tell what is wrong.
        findings = [line for r in rows for line in str(r[0]).splitlines() if line.strip()]
        summary = "; ".join(findings[:3])
        return summary + (f"; and {len(findings) - 3} more" if len(findings) > 3 else "")

    def _refuse(self, version: int) -> AiosError:
        """The error for a file of a newer schema version, remembered in :attr:`refused`."""
        # A newer aiosd may have changed the tables in ways this code would damage.
        log.error(
            "storage of uid %d (%s) has schema version %d; this aiosd knows versions up "
            "to %d: left untouched",
            self.uid,
            self.path,
            version,
            len(MIGRATIONS),
        )
        self.refused = AiosError(
            f"storage of uid {self.uid} was written by a newer aiosd (schema version "
            f"{version}; this one knows up to {len(MIGRATIONS)}): it is left untouched; "
            "upgrade aiosd to use it"
        )
        return self.refused

    def _quarantine(self, problem: str) -> None:
        """Move the file aside, kept for recovery, and keep a notice for the user."""
        stamp = int(time.time())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while any(Path(f"{aside}{s}").exists() for s in ("", "-wal", "-shm")):
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}.{n}")
            n += 1
        # The notice first: a file moved aside is never replaced without one.
        self.ledger.add_notice(
            self.uid,
            f"storage of uid {self.uid} was found damaged ({problem}) and moved aside to "
            f"{aside.name}, where an administrator can recover it; this is a new, empty "
            "store (quotas set by an administrator still apply).",
        )
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                src.rename(Path(str(aside) + suffix))
        self.quarantined = aside
        log.error(
            "storage of uid %d failed its integrity check (%s): moved %s aside to %s and "
            "started an empty store; the old file is kept for recovery",
            self.uid,
            problem,
            self.path,
            aside,
        )

    def _migrate(self, db: sqlite3.Connection, version: int) -> None:
        """Bring the file from ``version`` to the newest, one transaction per migration."""
        for target in range(version + 1, len(MIGRATIONS) + 1):
            # executescript commits any open transaction first, so the transaction is part of
            # the script; the version is stamped inside it, together with the change.
            script = MIGRATIONS[target - 1]
            try:
                db.executescript(
                    f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {target};\nCOMMIT;"
                )
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                log.error(
                    "storage of uid %d: migrating %s to schema version %d failed; it stays at "
                    "version %d",
                    self.uid,
                    self.path,
                    target,
                    target - 1,
                )
                raise

    def _adopt_quotas(self, db: sqlite3.Connection) -> None:
        """Move quotas an older aiosd kept in this file to the daemon's ledger."""
        marks = ",".join("?" * len(_QUOTA_SETTINGS))
        rows = dict(
            db.execute(
                f"SELECT name, value FROM settings WHERE name IN ({marks})", _QUOTA_SETTINGS
            ).fetchall()
        )
        if not rows:
            return

        def value(name: str) -> int | None:
            v = rows.get(name)
            return None if v is None else int(v)

        # Into the ledger first: the file's copy goes only once the ledger has them.
        self.ledger.adopt_quotas(self.uid, value("quota_bytes"), value("quota_entries"))
        db.execute(f"DELETE FROM settings WHERE name IN ({marks})", _QUOTA_SETTINGS)
        log.info("storage of uid %d: its quotas moved to %s", self.uid, self.ledger.path)

    def close(self) -> None:
        """Close the database; the caller makes sure no other thread is using it."""
        if self.db is not None:
            self.db.close()
            self.db = None
        if self._own_ledger:
            self.ledger.close()

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

    def usage(self) -> Usage:
        """Bytes (everything stored, all versions kept) and entries (live keys) in use, with
        the quotas."""
        used_bytes, used_entries = self._counts()
        quota_bytes, quota_entries = self._quotas()
        return {
            "used_bytes": used_bytes,
            "used_entries": used_entries,
            "quota_bytes": quota_bytes,
            "quota_entries": quota_entries,
        }

    def _counts(self) -> tuple[int, int]:
        used_bytes, used_entries = self._db.execute(
            "SELECT bytes, entries FROM usage WHERE id = 1"
        ).fetchone()
        return int(used_bytes), int(used_entries)

    def _quotas(self) -> tuple[int, int]:
        quota_bytes, quota_entries = self.quotas
        return (
            self.limits.quota_bytes if quota_bytes is None else quota_bytes,
            self.limits.quota_entries if quota_entries is None else quota_entries,
        )

    def set_quota(self, quota_bytes: int | None, quota_entries: int | None) -> Usage:
        """Set this user's quotas (admins only; checked by the caller), in the ledger."""
        self.quotas = self.ledger.set_quotas(self.uid, quota_bytes, quota_entries)
        return self.usage()

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    def _within_quota(self, before: tuple[int, int], what: str) -> None:
        """Refuse (raise, so the transaction rolls back) a write that took the use over a quota.

        Checked on the counters the write itself moved, so whatever the write stored is
        counted; a write that shrinks a use already over its quota (an administrator lowered
        it) is let through.
        """
        after = self._counts()
        quotas = self._quotas()
        names = ("bytes", "entries")
        over = [
            name
            for name, old, new, quota in zip(names, before, after, quotas, strict=True)
            if new > quota and new > old
        ]
        if not over:
            return
        hint = (
            " (deleting a key keeps its history: delete it with purge to free its bytes)"
            if "bytes" in over
            else ""
        )
        raise QuotaExceeded(
            f"storage quota exceeded: {what} needs {after[0]} bytes and {after[1]} entries; "
            f"the quota is {quotas[0]} bytes and {quotas[1]} entries (in use: {before[0]} "
            f"bytes, {before[1]} entries){hint}",
            data={
                "used_bytes": before[0],
                "used_entries": before[1],
                "quota_bytes": quotas[0],
                "quota_entries": quotas[1],
                "needed_bytes": after[0],
                "needed_entries": after[1],
                "exceeded": over[0],
            },
        )

    # --- operations -----------------------------------------------------------------------

    def put(
        self, collection: str, key: str, value: bytes, is_text: bool, metadata: dict[str, Any]
    ) -> Written:
        """Store a new version; refuse (changing nothing) if it would exceed a quota."""
        size = len(value)
        now = time.time()
        meta_json = json.dumps(metadata, ensure_ascii=False, sort_keys=True)
        _encodable(collection=collection, key=key, metadata=meta_json)
        with self._tx():
            before = self._counts()
            head = self._head_id(collection, key)
            version = self._next_version(collection, key)
            pruned = self._db.execute(
                "SELECT id FROM versions WHERE collection = ? AND key = ? "
                "ORDER BY version DESC LIMIT -1 OFFSET ?",
                (collection, key, self.limits.retention - 1),
            ).fetchall()
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
                self._db.executemany("DELETE FROM versions WHERE id = ?", pruned)
            self._within_quota(before, "this write")
        return {
            "collection": collection,
            "key": key,
            "version": version,
            "size": size,
            "created": now,
        }

    def get(self, collection: str, key: str, version: int | None) -> StoredValue:
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
        metadata: dict[str, Any] = json.loads(meta)
        return {
            "collection": collection,
            "key": key,
            "version": int(ver),
            "value": value,
            "is_text": bool(is_text),
            "metadata": metadata,
            "size": int(size),
            "created": float(created),
        }

    def list_keys(self, collection: str, prefix: str, limit: int, after: str | None) -> KeyPage:
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

    def delete(self, collection: str, key: str) -> Deletion:
        """Remove a key; its history stays (a rollback brings it back).

        The deletion marker is a version too, and counts: a delete that would take the bytes
        over the quota is refused (a purge frees them instead).
        """
        with self._tx():
            before = self._counts()
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
            self._within_quota(before, "this delete")
        return {"collection": collection, "key": key, "version": version, "deleted": True}

    def purge(self, collection: str, key: str) -> None:
        """Remove a key and every version of it (the daemon's own collections: forgotten
        memory must not linger in history)."""
        with self._tx():
            head = self._head_id(collection, key)
            if head is not None:
                # Before its versions: the counters read the current version's cost.
                self._db.execute("DELETE FROM search WHERE rowid = ?", (head,))
                self._db.execute(
                    "DELETE FROM heads WHERE collection = ? AND key = ?", (collection, key)
                )
            cur = self._db.execute(
                "DELETE FROM versions WHERE collection = ? AND key = ?", (collection, key)
            )
            if cur.rowcount == 0:
                raise _not_found(collection, key, None)

    def history(self, collection: str, key: str) -> KeyHistory:
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
    ) -> RolledBack:
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
    ) -> list[SearchHit]:
        """BM25-ranked full-text search over text values and metadata."""
        sql = (
            "SELECT s.collection, s.key, v.version, bm25(search) AS score, "
            "snippet(search, 2, '[', ']', '…', 12) FROM search s "
            "JOIN versions v ON v.id = s.rowid WHERE search MATCH ? "
            f"AND s.collection IN ({','.join('?' * len(collections))})"
        )
        args: list[Any] = [fts_query(query), *collections]
        for k, v in metadata.items():
            # The member named exactly k: a JSON path ('$."k"') cannot name one whose name
            # has a double quote in it, and SQLite has no escape for it there.
            sql += (
                " AND EXISTS (SELECT 1 FROM json_each(v.metadata) m"
                " WHERE m.key = ? AND m.value = ?)"
            )
            args.extend([k, v])
        sql += " ORDER BY score LIMIT ? OFFSET ?"
        args.extend([limit, offset])
        try:
            rows = self._db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if _failing(exc):
                raise  # the file, not the query
            raise InvalidParams(f"invalid params: query: {exc}") from None
        return [
            {"collection": c, "key": k, "version": ver, "score": round(-score, 6), "snippet": snip}
            for c, k, ver, score, snip in rows
        ]

    def share(self, collection: str, gid: int, mode: str) -> None:
        """Let members of ``gid`` read ``collection``."""
        _encodable(collection=collection)
        with self._tx():
            before = self._counts()
            self._db.execute(
                "INSERT INTO shares(collection, gid, mode) VALUES (?, ?, ?) "
                "ON CONFLICT(collection, gid) DO UPDATE SET mode = excluded.mode",
                (collection, gid, mode),
            )
            self._within_quota(before, "this share")

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

    def shares(self) -> list[ShareGrant]:
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


class _Serial:
    """Runs one store's jobs one at a time, in order, on workers of a shared pool."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self._pool = pool
        self._jobs: deque[tuple[Future[Any], Callable[[], Any]]] = deque()
        self._mutex = threading.Lock()
        self._scheduled = False
        #: Jobs queued or running; one counts no more before its caller can see its result.
        self._unfinished = 0

    @property
    def busy(self) -> bool:
        """Whether a job is queued or running."""
        with self._mutex:
            return self._unfinished > 0

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Queue ``fn``; it runs after every job queued before it has ended."""
        job: Future[T] = Future()
        with self._mutex:
            self._jobs.append((job, fn))
            self._unfinished += 1
            if self._scheduled:
                return job
            self._scheduled = True
        self._pool.submit(self._drain)
        return job

    def _drain(self) -> None:
        for _ in range(BATCH):
            with self._mutex:
                if not self._jobs:
                    self._scheduled = False
                    return
                job, fn = self._jobs.popleft()
            if not job.set_running_or_notify_cancel():
                self._finished()
                continue  # cancelled before it started
            try:
                result = fn()
            except BaseException as exc:
                self._finished()
                job.set_exception(exc)
            else:
                self._finished()
                job.set_result(result)
        with self._mutex:
            if not self._jobs:
                self._scheduled = False
                return
        self._pool.submit(self._drain)

    def _finished(self) -> None:
        with self._mutex:
            self._unfinished -= 1


@dataclass(eq=False)
class _Open:
    """A store, the queue that gives its connection to one job at a time, and its holders."""

    store: UserStore
    jobs: _Serial
    #: Calls holding the store, which is not closed to make room meanwhile: a call holds it
    #: from when it waits for the open, so a store just opened outlasts its callers' return.
    holders: int = 0
    #: Whether a call found its file failing (it is closed, and the next call reopens it).
    failed: bool = False


def _retrieve(uid: int, task: asyncio.Task[Any]) -> None:
    """See how an open ended, which its callers may all have given up on meanwhile."""
    exc = None if task.cancelled() else task.exception()
    # The store logs the failures it expects (an AiosError); anything else is a bug.
    if exc is not None and not isinstance(exc, AiosError):
        log.error("opening the storage of uid %d failed", uid, exc_info=exc)


class StorageManager:
    """Opens each user's store on first use, keeps the most recently used ones open, and
    runs their work on a bounded pool of threads."""

    def __init__(
        self, directory: Path, durability: str, limits: Limits, max_open_stores: int = 64
    ) -> None:
        self.directory = directory
        self.durability = durability
        self.limits = limits
        self.max_open_stores = max_open_stores
        # A store runs on one worker at a time, so workers beyond the open stores stay idle.
        self._pool = ThreadPoolExecutor(
            max_workers=min(max_open_stores, WORKERS), thread_name_prefix="store"
        )
        #: Open stores, least recently used first.
        self._open: OrderedDict[int, _Open] = OrderedDict()
        #: Opens under way, with the store each opens: every first call of a uid awaits it.
        self._opening: dict[int, tuple[_Open, asyncio.Task[None]]] = {}
        #: Closes under way; a uid's next open waits for its previous connection to end.
        self._closing: dict[int, asyncio.Task[None]] = {}
        #: Connections counted against ``max_open_stores``: open, being opened, being closed.
        self._connections = 0
        #: Opens waiting in :meth:`_reserve` for a connection to be free.
        self._short = 0
        #: Uids whose file passed its integrity check in this run (a reopen skips it).
        self._checked: set[int] = set()
        #: Why a uid's file was refused (a newer schema): its calls fail alike for this run.
        self._refused: dict[int, str] = {}
        #: Uids whose file failed as damaged while in use, and how many times in a row.
        self._failures: dict[int, int] = {}
        #: The quotas administrators set and the notices of damage, outside the users' files.
        self._ledger = Ledger(directory / LEDGER_FILE)
        self._waiters: list[asyncio.Future[None]] = []
        self._closed = False
        #: Whether a close has stopped the worker threads (a second close has nothing to do).
        self._stopped = False

    async def run(self, uid: int, fn: Callable[[UserStore], T], *, tell: bool = False) -> T:
        """Run ``fn(store)`` on a worker thread, alone on ``uid``'s store, opening it if needed.

        ``tell``: the call is the user's own (not the daemon's, nor another user's), so if the
        user has yet to be told that their store was found damaged and moved aside, the call
        fails with that news instead of running, once.
        """
        entry = await self._acquire(uid)
        store = entry.store

        def work() -> T:
            if tell:
                news = store.take_notices()
                if news is not None:
                    raise AiosError(news)
            return fn(store)

        try:
            job = entry.jobs.submit(work)
        except BaseException:
            self._release(entry)
            raise
        try:
            # A caller that gives up cancels its job if it has not started; one that runs
            # cannot be interrupted, but the store's later jobs (its close too) wait for it.
            result = await asyncio.wrap_future(job)
        except sqlite3.Error as exc:
            raise self._failed(uid, entry, exc) from exc
        finally:
            self._release(entry)
        if uid in self._failures and self._open.get(uid) is entry:
            del self._failures[uid]  # reopened and working again
        return result

    def _failed(self, uid: int, entry: _Open, exc: sqlite3.Error) -> AiosError:
        """The error for a call whose work SQLite failed; a failing file is closed, to be
        reopened (and checked) by the next call, without a restart."""
        if not _failing(exc):
            # A lock held too long, a full disk: the connection is sound, the call failed.
            return AiosError(f"storage of uid {uid} failed: {exc}")
        if not entry.failed:
            entry.failed = True
            if _damaged(exc):
                self._failures[uid] = self._failures.get(uid, 0) + 1
            self._checked.discard(uid)  # the reopen checks the file again
            log.error(
                "storage of uid %d failed while in use: %s; it is closed, and the next request "
                "reopens and checks it",
                uid,
                exc,
            )
            if self._open.get(uid) is entry:
                self._evict(uid)  # after the jobs queued on it, which may fail alike
        return AiosError(
            f"storage of uid {uid} failed: {exc} (the store is closed; the next request "
            "reopens it and checks the file)"
        )

    def exists(self, uid: int) -> bool:
        """Whether ``uid`` has a store at all (without creating one)."""
        return uid in self._open or (self.directory / f"{uid}.sqlite").exists()

    async def run_existing(
        self, uid: int, fn: Callable[[UserStore], T], default: T, *, tell: bool = False
    ) -> T:
        """:meth:`run` if ``uid`` has a store, else ``default`` (no store is created)."""
        if not self.exists(uid):
            return default
        if tell:
            return await self.run(uid, fn, tell=True)
        return await self.run(uid, fn)  # as subclasses that wrap run(uid, fn) expect

    async def close(self) -> None:
        """Let the calls under way end, close every store and stop the worker threads."""
        self._closed = True
        self._wake()
        await asyncio.gather(*(task for _, task in self._opening.values()), return_exceptions=True)
        # A call holding a store has queued its job already (it does both in one step, and
        # the calls of an open that ends now are refused), so each close runs after the
        # calls under way on that store.
        for uid in list(self._open):
            self._evict(uid)
        await asyncio.gather(*self._closing.values())
        if not self._stopped:
            self._stopped = True
            await asyncio.wrap_future(self._pool.submit(self._ledger.close))
        # Every worker is idle now: joining them is immediate.
        self._pool.shutdown(wait=True)

    # --- open stores ------------------------------------------------------------------------

    async def _acquire(self, uid: int) -> _Open:
        """``uid``'s open store, held by the caller until :meth:`_release`."""
        if self._closed:
            raise ShuttingDown("storage is closed: the daemon is stopping")
        refused = self._refused.get(uid)
        if refused is not None:
            raise AiosError(refused)
        entry = self._open.get(uid)
        if entry is not None:
            self._open.move_to_end(uid)
            entry.holders += 1
            return entry
        opening = self._opening.get(uid)
        if opening is None:
            store = UserStore(
                self.directory / f"{uid}.sqlite", uid, self.durability, self.limits, self._ledger
            )
            store.failures = self._failures.get(uid, 0)
            entry = _Open(store, _Serial(self._pool))
            task = asyncio.get_running_loop().create_task(self._open_store(uid, entry))
            task.add_done_callback(functools.partial(_retrieve, uid))
            opening = self._opening[uid] = (entry, task)
        entry, task = opening
        entry.holders += 1
        try:
            # Shielded: a caller that gives up must not cancel the open that others await.
            await asyncio.shield(task)
            if self._closed:
                raise ShuttingDown("storage is closed: the daemon is stopping")
        except BaseException:
            self._release(entry)
            raise
        return entry

    def _release(self, entry: _Open) -> None:
        entry.holders -= 1
        if entry.holders == 0 and self._waiters:
            self._wake()  # an idle store can be closed for one who waits for room

    async def _open_store(self, uid: int, entry: _Open) -> None:
        """Open ``entry``'s store once a connection is free, then add it to the open ones."""
        try:
            await self._reserve(uid)
        except BaseException:
            del self._opening[uid]
            raise
        job: Future[None] | None = None
        try:
            previous = self._closing.get(uid)
            if previous is not None:
                # Shielded: cancelling this open must not cancel that close half-way.
                await asyncio.shield(previous)
            check = uid not in self._checked
            job = entry.jobs.submit(lambda: entry.store.open(check))
            await asyncio.wrap_future(job)
        except BaseException:
            del self._opening[uid]
            if entry.store.refused is not None:
                self._refused[uid] = entry.store.refused.message
            if entry.store.quarantined is not None:
                self._failures.pop(uid, None)  # the next open makes a new file
            if (
                job is not None
                and not job.cancelled()
                and (not job.done() or job.exception() is None)
            ):
                # Cancelled while the open runs on its worker, where it cannot be stopped:
                # close what it opens right after it, counted as open until then.
                self._closing[uid] = asyncio.get_running_loop().create_task(
                    self._close_store(uid, entry)
                )
            else:
                self._connections -= 1
                self._wake()
            raise
        del self._opening[uid]
        if entry.store.quarantined is not None:
            self._failures.pop(uid, None)  # a new file, which has never failed
        self._checked.add(uid)
        self._open[uid] = entry
        # One who waits for room may close this store once its calls are done with it, or
        # at once if they all gave up meanwhile.
        self._wake()

    async def _reserve(self, uid: int) -> None:
        """Wait until one more store may open, closing least recently used idle ones as needed."""
        told = False
        self._short += 1
        try:
            while True:
                if self._closed:
                    raise ShuttingDown("storage is closed: the daemon is stopping")
                if self._connections < self.max_open_stores:
                    self._connections += 1
                    return
                # Each close under way frees a connection soon: close more stores only while
                # they are fewer than the opens waiting for one.
                while len(self._closing) < self._short:
                    idle = self._idle()
                    if idle is None:
                        break
                    self._evict(idle)
                if len(self._closing) < self._short and not told:
                    log.debug(
                        "all %d open stores are in use: uid %d waits for one to be free "
                        "([storage] max_open_stores)",
                        self.max_open_stores,
                        uid,
                    )
                    told = True
                await self._changed()
        finally:
            self._short -= 1

    def _idle(self) -> int | None:
        """The least recently used store no call holds, one with no job left first."""
        # A store whose last caller gave up while its job runs closes only after that job.
        busy = None
        for uid, entry in self._open.items():
            if entry.holders == 0:
                if not entry.jobs.busy:
                    return uid
                if busy is None:
                    busy = uid
        return busy

    def _evict(self, uid: int) -> None:
        entry = self._open.pop(uid)
        self._closing[uid] = asyncio.get_running_loop().create_task(self._close_store(uid, entry))

    async def _close_store(self, uid: int, entry: _Open) -> None:
        try:
            # In the store's queue: after its last job, with no other thread on the connection.
            await asyncio.wrap_future(entry.jobs.submit(entry.store.close))
        except Exception:
            log.exception("closing the storage of uid %d failed", uid)
        finally:
            del self._closing[uid]
            self._connections -= 1
            self._wake()

    async def _changed(self) -> None:
        """Wait until a store is released, opened, closed or fails to open (or storage closes)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

"""The ``storage.*`` syscalls: long-term, per-user, versioned, searchable, shareable data.

Values are text (``encoding = "text"``) or binary, as base64 text (``encoding = "base64"``).
Collections named by clients start with a letter or digit; names starting with ``_`` are the
daemon's own (memory evicted to storage lives there) and cannot be named in these calls.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, model_validator

from aiosd.errors import InvalidParams, NotFound, PermissionDenied
from aiosd.kernel.syscall_base import (
    BusBinary,
    Emit,
    Metadata,
    MetadataFilter,
    NoParams,
    Params,
    Result,
    syscall,
)
from aiosd.managers.access import Caller, Permission
from aiosd.managers.storage import StorageManager
from aiosd.managers.users import UserDirectory

Collection = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
]
Key = Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[^\x00]+$")]
Owner = (
    Annotated[int, Field(ge=0, le=2**32 - 2)] | Annotated[str, Field(min_length=1, max_length=64)]
)
MAX_VALUE_CHARS = 96 * 1024 * 1024


class PutParams(Params):
    """Parameters of ``storage.put``."""

    collection: Collection
    key: Key
    value: Annotated[str, Field(max_length=MAX_VALUE_CHARS), BusBinary()]
    encoding: Literal["text", "base64"] = "text"
    metadata: Metadata | None = None
    #: The decoded value when ``encoding`` is base64 (decoded once, while validating).
    _decoded: bytes | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _value_decodes(self) -> PutParams:
        if self.encoding == "base64":
            try:
                self._decoded = base64.b64decode(self.value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("value: not valid base64") from None
        return self

    def raw(self) -> bytes:
        """The value's bytes."""
        if self._decoded is not None:
            return self._decoded
        return self.value.encode("utf-8")


class PutResult(Result):
    """Result of ``storage.put`` (and of ``storage.rollback``, with ``from_version``)."""

    collection: str
    key: str
    version: int
    size: int
    created: float
    from_version: int | None = None


class GetParams(Params):
    """Parameters of ``storage.get``."""

    collection: Collection
    key: Key
    version: Annotated[int, Field(ge=1)] | None = None
    owner: Owner | None = None


class GetResult(Result):
    """Result of ``storage.get``."""

    collection: str
    key: str
    version: int
    value: Annotated[str, BusBinary()]
    encoding: Literal["text", "base64"]
    metadata: dict[str, Any]
    size: int
    created: float


class ListParams(Params):
    """Parameters of ``storage.list``."""

    collection: Collection
    prefix: Annotated[str, Field(max_length=1024)] = ""
    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    after: Key | None = None
    owner: Owner | None = None


class ListEntry(BaseModel):
    """One key of ``storage.list``."""

    key: str
    version: int
    size: int
    updated: float


class ListResult(Result):
    """Result of ``storage.list``; pass ``next`` as ``after`` for the next page."""

    entries: list[ListEntry]
    next: str | None


class KeyParams(Params):
    """Parameters of ``storage.delete``."""

    collection: Collection
    key: Key
    #: Also erase every kept version (frees their bytes; cannot be undone).
    purge: bool = False


class DeleteResult(Result):
    """Result of ``storage.delete``."""

    collection: str
    key: str
    version: int
    deleted: bool


class HistoryParams(Params):
    """Parameters of ``storage.history``."""

    collection: Collection
    key: Key
    owner: Owner | None = None


class VersionInfo(BaseModel):
    """One kept version."""

    version: int
    size: int
    created: float
    deleted: bool


class HistoryResult(Result):
    """Result of ``storage.history``: versions oldest first."""

    collection: str
    key: str
    versions: list[VersionInfo]


class RollbackParams(Params):
    """Parameters of ``storage.rollback``: exactly one of ``version`` and ``at``."""

    collection: Collection
    key: Key
    version: Annotated[int, Field(ge=1)] | None = None
    at: Annotated[float, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _one_target(self) -> RollbackParams:
        if (self.version is None) == (self.at is None):
            raise ValueError("give exactly one of version and at")
        return self


class SearchParams(Params):
    """Parameters of ``storage.search``."""

    query: Annotated[str, Field(min_length=1, max_length=1024)]
    collection: Collection | None = None
    metadata: MetadataFilter | None = None
    limit: Annotated[int, Field(ge=1, le=100)] = 20
    offset: Annotated[int, Field(ge=0, le=10000)] = 0
    owner: Owner | None = None


class Hit(BaseModel):
    """One search hit; a higher score is a better match (BM25)."""

    collection: str
    key: str
    version: int
    score: float
    snippet: str


class SearchResult(Result):
    """Result of ``storage.search``."""

    hits: list[Hit]


class ShareParams(Params):
    """Parameters of ``storage.share`` and ``storage.unshare``."""

    collection: Collection
    group: Annotated[str, Field(min_length=1, max_length=64)]


class ShareWithMode(ShareParams):
    """Parameters of ``storage.share``."""

    mode: Literal["read"] = "read"


class Share(BaseModel):
    """One group a collection is shared with."""

    group: str
    gid: int
    mode: str


class ShareResult(Result):
    """Result of ``storage.share`` and ``storage.unshare``: the collection's shares now."""

    collection: str
    shares: list[Share]


class UsageResult(Result):
    """Result of ``storage.usage`` and ``storage.set_quota``."""

    uid: int
    used_bytes: int
    used_entries: int
    quota_bytes: int
    quota_entries: int


class SetQuotaParams(Params):
    """Parameters of ``storage.set_quota`` (administrators)."""

    user: Owner
    quota_bytes: Annotated[int, Field(ge=0, le=1 << 50)] | None = None
    quota_entries: Annotated[int, Field(ge=0, le=1 << 40)] | None = None


# --- handlers --------------------------------------------------------------------------------


class StorageSyscalls:
    """Handlers of ``storage.*``: the storage manager, the user directory, the value limit."""

    def __init__(
        self, storage: StorageManager, users: UserDirectory, max_value_bytes: Callable[[], int]
    ) -> None:
        self.storage = storage
        self.users = users
        #: Read at each put: a reload changes it live.
        self.max_value_bytes = max_value_bytes

    async def _uid_of(self, owner: int | str) -> int:
        if isinstance(owner, int):
            return owner
        uid = await self.users.uid_of(owner)
        if uid is None:
            raise InvalidParams(f"invalid params: no user named {owner!r}")
        return uid

    async def _readable(self, c: Caller, owner: int | str | None, collection: str) -> int:
        """The uid whose store to read: the caller's own, or an owner who shared it."""
        if owner is None:
            return c.uid
        uid = await self._uid_of(owner)
        if uid == c.uid:
            return uid
        return await self._shared_by(c, uid, collection)

    async def _shared_by(self, c: Caller, uid: int, collection: str) -> int:
        """``uid`` (another user) if it shared ``collection`` with one of the caller's groups."""
        groups = c.groups | {c.gid}
        if await self.storage.run_existing(uid, lambda s: s.shared_with(collection, groups), False):
            return uid
        # Exactly what a missing entry says: whether the owner has such data is not leaked.
        raise NotFound(f"no collection {collection!r} readable by you for uid {uid}")

    @syscall(
        "storage.put",
        PutParams,
        PutResult,
        Permission.user,
        "Store a value as the key's newest version (text, or base64 for binary).",
    )
    async def put(self, p: PutParams, c: Caller, emit: Emit | None) -> Result:
        """``storage.put``."""
        raw = p.raw()
        limit = self.max_value_bytes()
        if len(raw) > limit:
            raise InvalidParams(
                f"invalid params: value: {len(raw)} bytes, more than storage.max_value_bytes "
                f"({limit})",
                data={"errors": [{"field": "value", "message": f"larger than {limit} bytes"}]},
            )
        is_text = p.encoding == "text"
        meta = p.metadata or {}
        out = await self.storage.run(
            c.uid, lambda s: s.put(p.collection, p.key, raw, is_text, meta), tell=True
        )
        return PutResult(**out)

    @syscall(
        "storage.get",
        GetParams,
        GetResult,
        Permission.user,
        "Read a key's current value or a given version (own, or shared with you).",
    )
    async def get(self, p: GetParams, c: Caller, emit: Emit | None) -> Result:
        """``storage.get``."""
        uid = await self._readable(c, p.owner, p.collection)
        row = await self.storage.run(
            uid, lambda s: s.get(p.collection, p.key, p.version), tell=uid == c.uid
        )
        value = row["value"]
        is_text = row["is_text"]
        return GetResult(
            collection=row["collection"],
            key=row["key"],
            version=row["version"],
            value=value.decode("utf-8") if is_text else base64.b64encode(value).decode("ascii"),
            encoding="text" if is_text else "base64",
            metadata=row["metadata"],
            size=row["size"],
            created=row["created"],
        )

    @syscall(
        "storage.list",
        ListParams,
        ListResult,
        Permission.user,
        "List a collection's keys by prefix, a page at a time.",
    )
    async def list_keys(self, p: ListParams, c: Caller, emit: Emit | None) -> Result:
        """``storage.list``."""
        uid = await self._readable(c, p.owner, p.collection)
        out = await self.storage.run(
            uid, lambda s: s.list_keys(p.collection, p.prefix, p.limit, p.after), tell=uid == c.uid
        )
        return ListResult(entries=[ListEntry(**e) for e in out["entries"]], next=out["next"])

    @syscall(
        "storage.delete",
        KeyParams,
        DeleteResult,
        Permission.user,
        "Delete a key; its history stays (a rollback restores it) unless purge is set.",
    )
    async def delete(self, p: KeyParams, c: Caller, emit: Emit | None) -> Result:
        """``storage.delete``."""
        if p.purge:
            await self.storage.run(c.uid, lambda s: s.purge(p.collection, p.key), tell=True)
            return DeleteResult(collection=p.collection, key=p.key, version=0, deleted=True)
        out = await self.storage.run(c.uid, lambda s: s.delete(p.collection, p.key), tell=True)
        return DeleteResult(**out)

    @syscall(
        "storage.search",
        SearchParams,
        SearchResult,
        Permission.user,
        "Full-text search (BM25) over text values and metadata.",
    )
    async def search(self, p: SearchParams, c: Caller, emit: Emit | None) -> Result:
        """``storage.search``."""
        meta = p.metadata or {}
        uid = c.uid if p.owner is None else await self._uid_of(p.owner)
        if uid != c.uid:
            if p.collection is None:
                raise InvalidParams(
                    "invalid params: collection: required to search another user's shared "
                    "collection"
                )
            uid = await self._shared_by(c, uid, p.collection)
        collections = [p.collection] if p.collection is not None else None
        if collections is None:
            # Everything of the caller's own except the daemon's reserved collections.
            names = await self.storage.run(uid, lambda s: s.collections(), tell=True)
            collections = [n for n in names if not n.startswith("_")]
            if not collections:
                return SearchResult(hits=[])
        hits = await self.storage.run(
            uid,
            lambda s: s.search(p.query, collections, meta, p.limit, p.offset),
            tell=uid == c.uid,
        )
        return SearchResult(hits=[Hit(**h) for h in hits])

    @syscall(
        "storage.history",
        HistoryParams,
        HistoryResult,
        Permission.user,
        "List a key's kept versions with times and sizes.",
    )
    async def history(self, p: HistoryParams, c: Caller, emit: Emit | None) -> Result:
        """``storage.history``."""
        uid = await self._readable(c, p.owner, p.collection)
        out = await self.storage.run(
            uid, lambda s: s.history(p.collection, p.key), tell=uid == c.uid
        )
        return HistoryResult(
            collection=out["collection"],
            key=out["key"],
            versions=[VersionInfo(**v) for v in out["versions"]],
        )

    @syscall(
        "storage.rollback",
        RollbackParams,
        PutResult,
        Permission.user,
        "Make an older version (or the version at a time) current, as a new version.",
    )
    async def rollback(self, p: RollbackParams, c: Caller, emit: Emit | None) -> Result:
        """``storage.rollback``."""
        out = await self.storage.run(
            c.uid, lambda s: s.rollback(p.collection, p.key, p.version, p.at), tell=True
        )
        return PutResult(**out)

    async def _gid_named(self, name: str) -> int:
        gid = await self.users.gid_of(name)
        if gid is None:
            raise InvalidParams(f"invalid params: group: no group named {name!r}")
        return gid

    @syscall(
        "storage.share",
        ShareWithMode,
        ShareResult,
        Permission.user,
        "Let members of one of your groups read a collection.",
    )
    async def share(self, p: ShareWithMode, c: Caller, emit: Emit | None) -> Result:
        """``storage.share``."""
        gid = await self._gid_named(p.group)
        if not c.in_group(gid):
            raise PermissionDenied(f"you may share only with groups you belong to; not {p.group!r}")
        await self.storage.run(c.uid, lambda s: s.share(p.collection, gid, p.mode), tell=True)
        return await self._shares(c, p.collection)

    @syscall(
        "storage.unshare",
        ShareParams,
        ShareResult,
        Permission.user,
        "Revoke a group's access to a collection, at once.",
    )
    async def unshare(self, p: ShareParams, c: Caller, emit: Emit | None) -> Result:
        """``storage.unshare``."""
        gid = await self._gid_named(p.group)
        if not await self.storage.run(c.uid, lambda s: s.unshare(p.collection, gid), tell=True):
            raise NotFound(f"collection {p.collection!r} is not shared with {p.group!r}")
        return await self._shares(c, p.collection)

    async def _shares(self, c: Caller, collection: str) -> ShareResult:
        rows = await self.storage.run(c.uid, lambda s: s.shares(), tell=True)
        mine = []
        for r in rows:
            if r["collection"] == collection:
                name = await self.users.group_name(r["gid"])
                mine.append(
                    Share(
                        group=name if name is not None else str(r["gid"]),
                        gid=r["gid"],
                        mode=r["mode"],
                    )
                )
        return ShareResult(collection=collection, shares=mine)

    @syscall(
        "storage.usage", NoParams, UsageResult, Permission.user, "Your storage use and quotas."
    )
    async def usage(self, p: NoParams, c: Caller, emit: Emit | None) -> Result:
        """``storage.usage``."""
        use = await self.storage.run(c.uid, lambda s: s.usage(), tell=True)
        return UsageResult(uid=c.uid, **use)

    @syscall(
        "storage.set_quota",
        SetQuotaParams,
        UsageResult,
        Permission.admin,
        "Set a user's storage quotas (administrators).",
    )
    async def set_quota(self, p: SetQuotaParams, c: Caller, emit: Emit | None) -> Result:
        """``storage.set_quota``."""
        uid = await self._uid_of(p.user)
        out = await self.storage.run(uid, lambda s: s.set_quota(p.quota_bytes, p.quota_entries))
        return UsageResult(uid=uid, **out)

"""The ``storage.*`` syscalls: long-term, per-user, versioned, searchable, shareable data.

Values are text (``encoding = "text"``) or binary, as base64 text (``encoding = "base64"``).
Collections named by clients start with a letter or digit; names starting with ``_`` are the
daemon's own (memory evicted to storage lives there) and cannot be named in these calls.
"""

from __future__ import annotations

import base64
import binascii
import grp
import pwd
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, model_validator

from aiosd.errors import InvalidParams, NotFound, PermissionDenied
from aiosd.kernel.syscall_base import BusBinary, Emit, NoParams, Params, Result, Syscall
from aiosd.managers.access import Caller, Permission

if TYPE_CHECKING:
    from aiosd.kernel.kernel import Kernel

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
    metadata: dict[str, Any] | None = None
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
    metadata: dict[str, str | int | float | bool] | None = None
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


class ShareResult(Result):
    """Result of ``storage.share`` and ``storage.unshare``: the collection's shares now."""

    collection: str
    shares: list[dict[str, Any]]


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


def _uid_of(owner: int | str) -> int:
    if isinstance(owner, int):
        return owner
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise InvalidParams(f"invalid params: no user named {owner!r}") from None


async def _readable(k: Kernel, c: Caller, owner: int | str | None, collection: str) -> int:
    """The uid whose store to read: the caller's own, or an owner who shared ``collection``."""
    if owner is None:
        return c.uid
    uid = _uid_of(owner)
    if uid == c.uid:
        return uid
    return await _shared_by(k, c, uid, collection)


async def _shared_by(k: Kernel, c: Caller, uid: int, collection: str) -> int:
    """``uid`` (another user) if it shared ``collection`` with one of the caller's groups."""
    groups = c.groups | {c.gid}
    if await k.storage.run_existing(uid, lambda s: s.shared_with(collection, groups), False):
        return uid
    # Exactly what a missing entry says: whether the owner has such data is not leaked.
    raise NotFound(f"no collection {collection!r} readable by you for uid {uid}")


async def _put(k: Kernel, p: PutParams, c: Caller, emit: Emit | None) -> Result:
    raw = p.raw()
    limit = k.config.storage.max_value_bytes
    if len(raw) > limit:
        raise InvalidParams(
            f"invalid params: value: {len(raw)} bytes, more than storage.max_value_bytes ({limit})",
            data={"errors": [{"field": "value", "message": f"larger than {limit} bytes"}]},
        )
    is_text = p.encoding == "text"
    meta = p.metadata or {}
    out = await k.storage.run(c.uid, lambda s: s.put(p.collection, p.key, raw, is_text, meta))
    return PutResult(**out)


async def _get(k: Kernel, p: GetParams, c: Caller, emit: Emit | None) -> Result:
    uid = await _readable(k, c, p.owner, p.collection)
    row = await k.storage.run(uid, lambda s: s.get(p.collection, p.key, p.version))
    value: bytes = row.pop("value")
    is_text = row.pop("is_text")
    return GetResult(
        **row,
        value=value.decode("utf-8") if is_text else base64.b64encode(value).decode("ascii"),
        encoding="text" if is_text else "base64",
    )


async def _list(k: Kernel, p: ListParams, c: Caller, emit: Emit | None) -> Result:
    uid = await _readable(k, c, p.owner, p.collection)
    out = await k.storage.run(uid, lambda s: s.list_keys(p.collection, p.prefix, p.limit, p.after))
    return ListResult(**out)


async def _delete(k: Kernel, p: KeyParams, c: Caller, emit: Emit | None) -> Result:
    if p.purge:
        await k.storage.run(c.uid, lambda s: s.purge(p.collection, p.key))
        return DeleteResult(collection=p.collection, key=p.key, version=0, deleted=True)
    return DeleteResult(**await k.storage.run(c.uid, lambda s: s.delete(p.collection, p.key)))


async def _history(k: Kernel, p: HistoryParams, c: Caller, emit: Emit | None) -> Result:
    uid = await _readable(k, c, p.owner, p.collection)
    return HistoryResult(**await k.storage.run(uid, lambda s: s.history(p.collection, p.key)))


async def _rollback(k: Kernel, p: RollbackParams, c: Caller, emit: Emit | None) -> Result:
    out = await k.storage.run(c.uid, lambda s: s.rollback(p.collection, p.key, p.version, p.at))
    return PutResult(**out)


async def _search(k: Kernel, p: SearchParams, c: Caller, emit: Emit | None) -> Result:
    meta = p.metadata or {}
    uid = c.uid if p.owner is None else _uid_of(p.owner)
    if uid != c.uid:
        if p.collection is None:
            raise InvalidParams(
                "invalid params: collection: required to search another user's shared collection"
            )
        uid = await _shared_by(k, c, uid, p.collection)
    collections = [p.collection] if p.collection is not None else None
    if collections is None:
        # Everything of the caller's own except the daemon's reserved collections.
        collections = [
            n for n in await k.storage.run(uid, lambda s: s.collections()) if not n.startswith("_")
        ]
        if not collections:
            return SearchResult(hits=[])
    hits = await k.storage.run(
        uid, lambda s: s.search(p.query, collections, meta, p.limit, p.offset)
    )
    return SearchResult(hits=[Hit(**h) for h in hits])


def _gid_named(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise InvalidParams(f"invalid params: group: no group named {name!r}") from None


def _group_of(c: Caller, name: str) -> int:
    gid = _gid_named(name)
    if not c.in_group(gid):
        raise PermissionDenied(f"you may share only with groups you belong to; not {name!r}")
    return gid


async def _share(k: Kernel, p: ShareWithMode, c: Caller, emit: Emit | None) -> Result:
    gid = _group_of(c, p.group)
    await k.storage.run(c.uid, lambda s: s.share(p.collection, gid, p.mode))
    return await _shares(k, c, p.collection)


async def _unshare(k: Kernel, p: ShareParams, c: Caller, emit: Emit | None) -> Result:
    gid = _gid_named(p.group)
    if not await k.storage.run(c.uid, lambda s: s.unshare(p.collection, gid)):
        raise NotFound(f"collection {p.collection!r} is not shared with {p.group!r}")
    return await _shares(k, c, p.collection)


async def _shares(k: Kernel, c: Caller, collection: str) -> ShareResult:
    rows = await k.storage.run(c.uid, lambda s: s.shares())
    mine = [
        {"group": _group_name(r["gid"]), "gid": r["gid"], "mode": r["mode"]}
        for r in rows
        if r["collection"] == collection
    ]
    return ShareResult(collection=collection, shares=mine)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


async def _usage(k: Kernel, p: NoParams, c: Caller, emit: Emit | None) -> Result:
    return UsageResult(uid=c.uid, **await k.storage.run(c.uid, lambda s: s.usage()))


async def _set_quota(k: Kernel, p: SetQuotaParams, c: Caller, emit: Emit | None) -> Result:
    uid = _uid_of(p.user)
    out = await k.storage.run(uid, lambda s: s.set_quota(p.quota_bytes, p.quota_entries))
    return UsageResult(uid=uid, **out)


SYSCALLS = (
    Syscall(
        "storage.put",
        PutParams,
        PutResult,
        Permission.user,
        _put,
        "Store a value as the key's newest version (text, or base64 for binary).",
    ),
    Syscall(
        "storage.get",
        GetParams,
        GetResult,
        Permission.user,
        _get,
        "Read a key's current value or a given version (own, or shared with you).",
    ),
    Syscall(
        "storage.list",
        ListParams,
        ListResult,
        Permission.user,
        _list,
        "List a collection's keys by prefix, a page at a time.",
    ),
    Syscall(
        "storage.delete",
        KeyParams,
        DeleteResult,
        Permission.user,
        _delete,
        "Delete a key; its history stays (a rollback restores it) unless purge is set.",
    ),
    Syscall(
        "storage.search",
        SearchParams,
        SearchResult,
        Permission.user,
        _search,
        "Full-text search (BM25) over text values and metadata.",
    ),
    Syscall(
        "storage.history",
        HistoryParams,
        HistoryResult,
        Permission.user,
        _history,
        "List a key's kept versions with times and sizes.",
    ),
    Syscall(
        "storage.rollback",
        RollbackParams,
        PutResult,
        Permission.user,
        _rollback,
        "Make an older version (or the version at a time) current, as a new version.",
    ),
    Syscall(
        "storage.share",
        ShareWithMode,
        ShareResult,
        Permission.user,
        _share,
        "Let members of one of your groups read a collection.",
    ),
    Syscall(
        "storage.unshare",
        ShareParams,
        ShareResult,
        Permission.user,
        _unshare,
        "Revoke a group's access to a collection, at once.",
    ),
    Syscall(
        "storage.usage",
        NoParams,
        UsageResult,
        Permission.user,
        _usage,
        "Your storage use and quotas.",
    ),
    Syscall(
        "storage.set_quota",
        SetQuotaParams,
        UsageResult,
        Permission.admin,
        _set_quota,
        "Set a user's storage quotas (administrators).",
    ),
)

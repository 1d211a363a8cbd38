"""The built-in tools: the OS bridge (processes, files, system facts, the desktop) and the
caller's own storage and memory.

Each tool's arguments are a pydantic model: its JSON schema is what ``tool.list`` shows and
what the embedded model's grammar is built from, and its validation is the daemon's check of
a call.  File, signal and notification work runs in the caller's worker, as the caller;
process views and system facts in the daemon (in a thread: psutil reads /proc); storage and
memory tools are the caller's own syscalls.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aiosd.managers.tools import Annotations, Context, Tool, ToolFailure, ToolManager
from aiosd.osbridge import processes, system

Path = Annotated[
    str,
    Field(
        min_length=1,
        max_length=4096,
        pattern=r"^[^\x00]+$",
        description="a path; ~ is your home, and a relative path is under it",
    ),
]

READ = Annotations(read_only=True, idempotent=True)


class Args(BaseModel):
    """Base of tool arguments: unknown members are errors."""

    model_config = ConfigDict(extra="forbid")


class NoArgs(Args):
    pass


class PathArgs(Args):
    path: Path


class ListArgs(Args):
    path: Path = "~"
    max_entries: Annotated[int, Field(ge=1, le=10_000)] = 200
    hidden: bool = Field(False, description="include names that start with a dot")


class ReadArgs(Args):
    path: Path
    max_bytes: Annotated[int, Field(ge=1, le=1 << 20)] = 65536
    offset: Annotated[int, Field(ge=0, le=1 << 62)] = 0


class SearchArgs(Args):
    path: Path = "~"
    name: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        None, description="a shell glob the file name must match, e.g. *.txt"
    )
    contains: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        None, description="text the file must contain (files up to 1 MiB are read)"
    )
    max_results: Annotated[int, Field(ge=1, le=1000)] = 50
    max_files: Annotated[int, Field(ge=1, le=200_000)] = 20_000
    max_depth: Annotated[int, Field(ge=0, le=64)] = 16


class DuArgs(Args):
    path: Path = "~"
    max_files: Annotated[int, Field(ge=1, le=2_000_000)] = 200_000


class WriteArgs(Args):
    path: Path
    content: Annotated[str, Field(max_length=4 << 20)]
    mode: Literal["create", "overwrite", "append"] = Field(
        "create", description="create: the file must not exist; overwrite: replace it whole"
    )


class ProcListArgs(Args):
    sort: Literal["cpu", "memory", "pid", "name"] = "cpu"
    limit: Annotated[int, Field(ge=1, le=1000)] = 20
    mine: bool = Field(False, description="only your own processes")
    name: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        None, description="only processes whose name contains this"
    )


class PidArgs(Args):
    pid: Annotated[int, Field(ge=1, le=2**22)]


class SignalArgs(Args):
    pid: Annotated[int, Field(ge=2, le=2**22)]
    signal: Literal[processes.SIGNALS] = "TERM"  # type: ignore[valid-type]


class NotifyArgs(Args):
    summary: Annotated[str, Field(min_length=1, max_length=256)]
    body: Annotated[str, Field(max_length=4096)] = ""
    urgency: Literal["low", "normal", "critical"] = "normal"
    timeout_ms: Annotated[int, Field(ge=-1, le=3_600_000)] = -1


Collection = Annotated[
    str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
]
Key = Annotated[str, Field(min_length=1, max_length=1024, pattern=r"^[^\x00]+$")]


class StorageSearchArgs(Args):
    query: Annotated[str, Field(min_length=1, max_length=1024)]
    limit: Annotated[int, Field(ge=1, le=100)] = 10


class StorageGetArgs(Args):
    collection: Collection
    key: Key


class StoragePutArgs(Args):
    collection: Collection
    key: Key
    value: Annotated[str, Field(max_length=1 << 20)]


class MemorySearchArgs(Args):
    query: Annotated[str, Field(min_length=1, max_length=1024)]
    limit: Annotated[int, Field(ge=1, le=100)] = 10


class MemoryAddArgs(Args):
    content: Annotated[str, Field(min_length=1, max_length=64 * 1024)]


def _worker(op: str) -> Any:
    """A tool that is operation ``op`` of the caller's worker."""

    async def run(ctx: Context, args: BaseModel) -> dict[str, Any]:
        return await ctx.in_worker(op, args.model_dump())

    return run


async def _proc_list(ctx: Context, a: ProcListArgs) -> dict[str, Any]:
    c = ctx.caller
    return await asyncio.to_thread(
        processes.list_processes, c.uid, _groups(c), a.sort, a.limit, a.mine, a.name
    )


async def _proc_info(ctx: Context, a: PidArgs) -> dict[str, Any]:
    c = ctx.caller
    got = await asyncio.to_thread(processes.process_info, c.uid, _groups(c), a.pid)
    if got is None:
        raise ToolFailure("os", f"no process {a.pid} (that you can see)", code="ESRCH")
    return got


def _groups(c: Any) -> frozenset[int]:
    return frozenset(c.groups) | {c.gid}


async def _system(ctx: Context, a: NoArgs) -> dict[str, Any]:
    return await asyncio.to_thread(system.system_info)


def _via(syscall: str, shape: Any) -> Any:
    """A tool that is the caller's own syscall ``syscall``."""

    async def run(ctx: Context, args: BaseModel) -> dict[str, Any]:
        try:
            result = await ctx.syscall(syscall, shape(args))
        except Exception as exc:  # an AiosError of the syscall: the tool's failure
            raise ToolFailure("syscall", f"{syscall}: {exc}") from None
        return result

    return run


def _get_shape(a: StorageGetArgs) -> dict[str, Any]:
    return {"collection": a.collection, "key": a.key}


def _put_shape(a: StoragePutArgs) -> dict[str, Any]:
    return {"collection": a.collection, "key": a.key, "value": a.value}


def _search_shape(a: StorageSearchArgs | MemorySearchArgs) -> dict[str, Any]:
    return {"query": a.query, "limit": a.limit}


def _add_shape(a: MemoryAddArgs) -> dict[str, Any]:
    return {"content": a.content}


WRITE = Annotations(read_only=False)
DESTRUCTIVE = Annotations(read_only=False, destructive=True)

BUILTINS = [
    Tool("fs.list", "List a directory: each entry's name, type, size, mode and modification "
         "time, sorted by name.", ListArgs, READ, _worker("fs.list"), as_user=True),
    Tool("fs.stat", "Details of one path: type, size, mode, owner, group, times (a symlink "
         "itself, with its target).", PathArgs, READ, _worker("fs.stat"), as_user=True),
    Tool("fs.read", "Read a text file (at most max_bytes from offset); binary files are "
         "refused.", ReadArgs, READ, _worker("fs.read"), as_user=True),
    Tool("fs.search", "Find files under a directory by name (a glob) and/or content (a "
         "text), within bounds; each match with its first matching line.", SearchArgs, READ,
         _worker("fs.search"), as_user=True),
    Tool("fs.du", "Disk usage of a file or tree, like du -s: bytes, files, directories.",
         DuArgs, READ, _worker("fs.du"), as_user=True),
    Tool("fs.write", "Write a text file: create a new one, overwrite one whole (atomically), "
         "or append to one.", WriteArgs, DESTRUCTIVE, _worker("fs.write"), as_user=True),
    Tool("proc.list", "Processes, like ps or top: sorted by CPU (sampled over a quarter "
         "second), memory, pid or name.", ProcListArgs, READ, _proc_list),
    Tool("proc.info", "One process in detail: command line, state, user, CPU time, memory, "
         "threads.", PidArgs, READ, _proc_info),
    Tool("proc.signal", "Send a signal to one of your own processes (TERM by default).",
         SignalArgs, DESTRUCTIVE, _worker("proc.signal"), as_user=True),
    Tool("system.info", "The machine: CPUs, load, memory, swap, disks, uptime, kernel.",
         NoArgs, READ, _system),
    Tool("notify.send", "Show a notification on your desktop (your graphical session).",
         NotifyArgs, Annotations(read_only=False), _worker("notify.send"), as_user=True),
    Tool("storage.search", "Search your long-term storage (full text): matching keys with "
         "snippets.", StorageSearchArgs, READ, _via("storage.search", _search_shape)),
    Tool("storage.get", "Read one value of your long-term storage.", StorageGetArgs, READ,
         _via("storage.get", _get_shape)),
    Tool("storage.put", "Store a text value in your long-term storage (a new version; the "
         "old ones are kept).", StoragePutArgs, WRITE, _via("storage.put", _put_shape)),
    Tool("memory.search", "Search your short-term memory.", MemorySearchArgs, READ,
         _via("memory.search", _search_shape)),
    Tool("memory.add", "Remember a short note in your short-term memory.", MemoryAddArgs,
         WRITE, _via("memory.add", _add_shape)),
]  # fmt: skip


def register(manager: ToolManager) -> None:
    """Add every built-in tool to ``manager``."""
    for tool in BUILTINS:
        manager.add(tool)

"""``aiosctl storage …`` and ``aiosctl memory …``: long-term storage and short-term memory."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

from aiosd.sdk.client import SyscallClient

#: aiosctl's memory commands use this named space by default: each aiosctl run is a new
#: connection, and a connection's own space ends with it.
CLI_SPACE = "aiosctl"


class UsageError(Exception):
    """Bad command-line input found after parsing."""


def _owner(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register the storage and memory command groups."""
    st = sub.add_parser("storage", parents=[common], help="long-term per-user storage")
    ss = st.add_subparsers(dest="storage_command", metavar="VERB", required=True)

    put = ss.add_parser("put", parents=[common], help="store a value (VALUE, --file, or stdin)")
    put.add_argument("collection")
    put.add_argument("key")
    put.add_argument("value", nargs="?", help="the value; omit to read --file or stdin")
    put.add_argument("--file", type=Path, help="read the value from this file")
    put.add_argument("--meta", help="metadata as a JSON object")
    put.add_argument(
        "--binary",
        action="store_true",
        help="store as binary even if the bytes are valid UTF-8 text",
    )
    put.set_defaults(func=storage_put)

    get = ss.add_parser("get", parents=[common], help="print a value")
    get.add_argument("collection")
    get.add_argument("key")
    get.add_argument("--version", type=int, help="an older version")
    get.add_argument("--owner", type=_owner, help="read a collection another user shared")
    get.add_argument("--output", type=Path, help="write the value to this file")
    get.set_defaults(func=storage_get)

    ls = ss.add_parser("ls", parents=[common], help="list keys")
    ls.add_argument("collection")
    ls.add_argument("--prefix", default="")
    ls.add_argument("--limit", type=int, default=100, help="keys per page (default 100)")
    ls.add_argument("--after", help="start after this key")
    ls.add_argument("--owner", type=_owner)
    ls.set_defaults(func=storage_ls)

    rm = ss.add_parser("rm", parents=[common], help="delete a key (history is kept)")
    rm.add_argument("collection")
    rm.add_argument("key")
    rm.add_argument(
        "--purge",
        action="store_const",
        const=True,
        help="also erase its history (frees the bytes; cannot be undone)",
    )
    rm.set_defaults(func=_simple("storage.delete", "collection", "key", "purge"))

    se = ss.add_parser("search", parents=[common], help="full-text search")
    se.add_argument("query", nargs="+")
    se.add_argument("--collection")
    se.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only entries whose metadata has KEY equal to VALUE (repeatable)",
    )
    se.add_argument("--limit", type=int, default=20)
    se.add_argument("--offset", type=int, default=0)
    se.add_argument("--owner", type=_owner)
    se.set_defaults(func=storage_search)

    hi = ss.add_parser("history", parents=[common], help="list a key's versions")
    hi.add_argument("collection")
    hi.add_argument("key")
    hi.add_argument("--owner", type=_owner)
    hi.set_defaults(func=storage_history)

    rb = ss.add_parser("rollback", parents=[common], help="make an older version current")
    rb.add_argument("collection")
    rb.add_argument("key")
    target = rb.add_mutually_exclusive_group(required=True)
    target.add_argument("--version", type=int)
    target.add_argument("--at", type=float, help="the version current at this Unix time")
    rb.set_defaults(func=_simple("storage.rollback", "collection", "key", "version", "at"))

    sh = ss.add_parser("share", parents=[common], help="let a group read a collection")
    sh.add_argument("collection")
    sh.add_argument("group")
    sh.set_defaults(func=_simple("storage.share", "collection", "group"))
    un = ss.add_parser("unshare", parents=[common], help="revoke a group's access")
    un.add_argument("collection")
    un.add_argument("group")
    un.set_defaults(func=_simple("storage.unshare", "collection", "group"))

    us = ss.add_parser("usage", parents=[common], help="your use and quotas")
    us.set_defaults(func=_simple("storage.usage"))
    qu = ss.add_parser("quota", parents=[common], help="set a user's quotas (administrators)")
    qu.add_argument("user", type=_owner)
    qu.add_argument("--bytes", type=int, dest="quota_bytes")
    qu.add_argument("--entries", type=int, dest="quota_entries")
    qu.set_defaults(func=_simple("storage.set_quota", "user", "quota_bytes", "quota_entries"))

    me = sub.add_parser("memory", parents=[common], help="short-term memory")
    ms = me.add_subparsers(dest="memory_command", metavar="VERB", required=True)
    space = argparse.ArgumentParser(add_help=False)
    space.add_argument("--space", default=CLI_SPACE, help=f"memory space (default {CLI_SPACE!r})")

    add = ms.add_parser("add", parents=[common, space], help="remember something")
    add.add_argument("content", nargs="+", help="the text ('-' reads stdin)")
    add.add_argument("--tag", action="append", dest="tags", help="a tag (repeatable)")
    add.add_argument("--pin", action="store_true", dest="pinned", help="never evict it")
    add.set_defaults(func=memory_add)

    mg = ms.add_parser("get", parents=[common, space], help="show an entry")
    mg.add_argument("id", type=int)
    mg.set_defaults(func=_simple("memory.get", "id", "space"))

    msr = ms.add_parser("search", parents=[common, space], help="search by keywords")
    msr.add_argument("query", nargs="+")
    msr.add_argument("--limit", type=int, default=10)
    msr.set_defaults(func=memory_search)

    mu = ms.add_parser("update", parents=[common, space], help="change an entry")
    mu.add_argument("id", type=int)
    mu.add_argument("--content")
    mu.add_argument("--tag", action="append", dest="tags")
    pin = mu.add_mutually_exclusive_group()
    pin.add_argument("--pin", action="store_const", const=True, dest="pinned")
    pin.add_argument("--unpin", action="store_const", const=False, dest="pinned")
    mu.set_defaults(func=_simple("memory.update", "id", "space", "content", "tags", "pinned"))

    mr = ms.add_parser("rm", parents=[common, space], help="forget an entry")
    mr.add_argument("id", type=int)
    mr.set_defaults(func=_simple("memory.delete", "id", "space"))

    mc = ms.add_parser("clear", parents=[common, space], help="forget a whole space")
    mc.add_argument("--all", action="store_false", dest="keep_pinned", help="pinned entries too")
    mc.set_defaults(func=_simple("memory.clear", "space", "keep_pinned"))


def print_json(obj: Any) -> None:
    """Print a result as indented JSON."""
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def pick(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named arguments that were given (not None), as syscall params."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def json_object(text: str, what: str, *, from_file: bool = False) -> dict[str, Any]:
    """Parse ``text`` (with ``from_file``, ``@FILE`` reads FILE) as a JSON object."""
    if from_file and text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except OSError as exc:
            raise UsageError(f"{what}: cannot read {text[1:]}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{what}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{what}: must be a JSON object")
    return value


def _simple(method: str, *names: str) -> Any:
    """A command that passes the given arguments (those set) and prints the JSON result."""

    def run(client: SyscallClient, args: argparse.Namespace) -> int:
        print_json(client.call(method, pick(args, *names)))
        return 0

    return run


def storage_put(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl storage put."""
    if args.value is not None and args.file is not None:
        raise UsageError("give either VALUE or --file, not both")
    if args.value is not None:
        data = args.value.encode()
    elif args.file is not None:
        try:
            data = args.file.read_bytes()
        except OSError as exc:
            raise UsageError(f"--file: cannot read {args.file}: {exc.strerror}") from None
    elif sys.stdin.isatty():
        raise UsageError("give VALUE, --file FILE, or pipe the value on standard input")
    else:
        data = sys.stdin.buffer.read()
    params: dict[str, Any] = {"collection": args.collection, "key": args.key}
    text: str | None = None
    if not args.binary:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass  # not text: sent as base64
    if text is not None:
        params.update(value=text, encoding="text")
    else:
        params.update(value=base64.b64encode(data).decode("ascii"), encoding="base64")
    if args.meta:
        params["metadata"] = json_object(args.meta, "--meta")
    result = client.call("storage.put", params)
    if args.json:
        print_json(result)
    else:
        print(
            f"{result['collection']}/{result['key']}: version {result['version']}, "
            f"{result['size']} bytes"
        )
    return 0


def storage_get(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl storage get."""
    result = client.call("storage.get", pick(args, "collection", "key", "version", "owner"))
    if args.json:
        print_json(result)
        return 0
    data = (
        base64.b64decode(result["value"])
        if result["encoding"] == "base64"
        else result["value"].encode()
    )
    if args.output is not None:
        args.output.write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0


def storage_ls(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl storage ls."""
    params = pick(args, "collection", "prefix", "limit", "after", "owner")
    result = client.call("storage.list", params)
    if args.json:
        print_json(result)
        return 0
    for e in result["entries"]:
        print(f"{e['key']}\tv{e['version']}\t{e['size']}")
    if result["next"]:
        print(f"(more: --after {result['next']})", file=sys.stderr)
    return 0


def storage_search(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl storage search."""
    params = {
        "query": " ".join(args.query),
        **pick(args, "limit", "offset", "collection", "owner"),
    }
    meta = {}
    for item in args.meta:
        if "=" not in item:
            raise UsageError(f"--meta: {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        try:  # numbers and true/false as JSON; anything else is a string
            parsed = json.loads(v)
            meta[k] = parsed if isinstance(parsed, (int, float, bool)) else v
        except ValueError:
            meta[k] = v
    if meta:
        params["metadata"] = meta
    result = client.call("storage.search", params)
    if args.json:
        print_json(result)
        return 0
    for h in result["hits"]:
        snippet = " ".join(h["snippet"].split())
        print(f"{h['score']:8.4f}  {h['collection']}/{h['key']}  {snippet}")
    return 0


def storage_history(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl storage history."""
    result = client.call("storage.history", pick(args, "collection", "key", "owner"))
    if args.json:
        print_json(result)
        return 0
    for v in result["versions"]:
        note = "  (deleted)" if v["deleted"] else ""
        print(f"v{v['version']}\t{v['size']}\t{v['created']:.3f}{note}")
    return 0


def memory_add(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl memory add."""
    content = sys.stdin.read() if args.content == ["-"] else " ".join(args.content)
    params: dict[str, Any] = {"content": content, "space": args.space, "pinned": args.pinned}
    if args.tags:
        params["tags"] = args.tags
    print_json(client.call("memory.add", params))
    return 0


def memory_search(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl memory search."""
    print_json(
        client.call(
            "memory.search",
            {"query": " ".join(args.query), "space": args.space, "limit": args.limit},
        )
    )
    return 0

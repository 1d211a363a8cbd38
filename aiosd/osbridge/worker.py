"""The user worker: the program that does a user's tool work, running as that user.

Started by the daemon (:mod:`aiosd.osbridge.workers`) through the same confinement as an
agent (``setpriv``: the user's uid, gid and groups, no capabilities, no new privileges,
SIGKILL when the daemon dies; a session of its own; a clean environment; umask 077), as
``python -I -m aiosd.osbridge.worker``.  It reads one request per line on stdin and writes
one answer per line on stdout, in order, one at a time:

    request:  {"id": 7, "op": "fs.read", "args": {...}}
    answer:   {"id": 7, "result": {...}}
          or  {"id": 7, "error": {"kind": "os", "errno": 13, "message": "...", "path": "..."}}
          or  {"id": 7, "error": {"kind": "tool", "message": "..."}}

The arguments were validated by the daemon; what the worker checks is the kernel's to
check.  A ``kind: os`` error is what the kernel said (``EACCES``, ``ENOENT``, ``EPERM``),
named so the caller can tell a refusal from a bug.  Nothing else is written on stdout.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from aiosd.osbridge import files
from aiosd.osbridge.processes import signal_pid


def _notify(**kw: Any) -> dict[str, Any]:
    from aiosd.osbridge.notifications import notify  # gi only when a notification is sent

    return notify(**kw)


#: What a worker does, by operation name.
OPS: dict[str, Callable[..., dict[str, Any]]] = {
    "fs.stat": files.fs_stat,
    "fs.list": files.fs_list,
    "fs.read": files.fs_read,
    "fs.search": files.fs_search,
    "fs.du": files.fs_du,
    "fs.write": files.fs_write,
    "proc.signal": signal_pid,
    "notify.send": _notify,
    "worker.whoami": lambda: {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "groups": sorted(os.getgroups()),
    },
}


def answer(req: dict[str, Any]) -> dict[str, Any]:
    """The answer to one request."""
    rid = req.get("id")
    op = OPS.get(str(req.get("op")))
    if op is None:
        return {"id": rid, "error": {"kind": "tool", "message": f"unknown op {req.get('op')!r}"}}
    try:
        return {"id": rid, "result": op(**(req.get("args") or {}))}
    except OSError as exc:
        code = exc.errno or 0
        return {
            "id": rid,
            "error": {
                "kind": "os",
                "errno": code,
                "code": _errname(code),
                "message": os.strerror(code) if code else str(exc),
                "path": exc.filename if isinstance(exc.filename, str) else None,
            },
        }
    except files.ToolError as exc:
        return {"id": rid, "error": {"kind": "tool", "message": str(exc)}}
    except Exception as exc:  # a bug here must not end the worker: say what it was
        return {"id": rid, "error": {"kind": "internal", "message": f"{type(exc).__name__}: {exc}"}}


def _errname(code: int) -> str:
    import errno

    return errno.errorcode.get(code, str(code))


def main() -> None:
    """Serve requests on stdin until it closes."""
    os.umask(0o077)
    home = os.environ.get("HOME")
    if home:
        try:
            os.chdir(home)
        except OSError:
            os.chdir("/")
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
        except ValueError:
            req = {"op": None}
        reply = answer(req if isinstance(req, dict) else {"op": None})
        # A name that is not UTF-8 (surrogate escapes) cannot travel as text: shown with U+FFFD.
        out.write(json.dumps(reply, ensure_ascii=False).encode("utf-8", "replace") + b"\n")
        out.flush()


if __name__ == "__main__":
    main()

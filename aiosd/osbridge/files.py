"""File tools: what a user's worker does with that user's files, as that user.

These functions run in the user worker (:mod:`aiosd.osbridge.worker`), a process with the
user's uid, gid and groups, never in the root daemon: every ``open``, ``stat`` and
``scandir`` here is checked by the kernel against the user's rights, and a refusal comes
back as the ``OSError`` the kernel gave (``EACCES`` on someone else's 0700 home or on
/etc/shadow).  Nothing here re-implements a permission check.

Paths are the user's: ``~`` and relative paths are under their home.  Every function is
bounded (entries, bytes, files visited, depth) and says when it stopped early
(``truncated``).  Only the standard library is used: the worker starts quickly.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import grp
import os
import pwd
import stat
import tempfile
from collections.abc import Iterator
from typing import Any

#: Bytes of a file searched for ``contains`` at most (larger files are searched in part).
SEARCH_FILE_BYTES = 1 << 20


class ToolError(Exception):
    """A tool cannot do what was asked, for a reason of its own (not the kernel's)."""


def resolve(path: str) -> str:
    """The absolute path ``path`` means for the user (``~``: their home; relative: under it)."""
    home = os.environ.get("HOME") or "/"
    if path == "~" or path.startswith("~/"):
        path = home + path[1:]
    elif path.startswith("~"):
        raise ToolError(f"{path}: only ~ (your home) is understood, not ~user")
    if not os.path.isabs(path):
        path = os.path.join(home, path)
    return os.path.normpath(path)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "other"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def fs_stat(path: str) -> dict[str, Any]:
    """What ``stat`` says of a path (a symlink itself, not its target)."""
    p = resolve(path)
    st = os.lstat(p)
    out: dict[str, Any] = {
        "path": p,
        "type": _kind(st.st_mode),
        "size": st.st_size,
        "mode": f"{stat.S_IMODE(st.st_mode):04o}",
        "user": _user(st.st_uid),
        "group": _group(st.st_gid),
        "modified": st.st_mtime,
        "changed": st.st_ctime,
        "accessed": st.st_atime,
        "links": st.st_nlink,
    }
    if stat.S_ISLNK(st.st_mode):
        out["target"] = os.readlink(p)
    return out


def fs_list(path: str, max_entries: int, hidden: bool) -> dict[str, Any]:
    """A directory's entries, sorted by name: name, type, size, mode, modification time."""
    p = resolve(path)
    entries: list[dict[str, Any]] = []
    truncated = False
    with os.scandir(p) as it:
        names = sorted(it, key=lambda e: e.name)
    for e in names:
        if not hidden and e.name.startswith("."):
            continue
        if len(entries) == max_entries:
            truncated = True
            break
        try:
            st = e.stat(follow_symlinks=False)
        except OSError as exc:
            entries.append({"name": e.name, "error": os.strerror(exc.errno or errno.EIO)})
            continue
        entries.append(
            {
                "name": e.name,
                "type": _kind(st.st_mode),
                "size": st.st_size,
                "mode": f"{stat.S_IMODE(st.st_mode):04o}",
                "modified": st.st_mtime,
            }
        )
    return {"path": p, "entries": entries, "truncated": truncated}


def fs_read(path: str, max_bytes: int, offset: int) -> dict[str, Any]:
    """Text of a file from ``offset``, at most ``max_bytes``; binary files are refused."""
    p = resolve(path)
    with open(p, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ToolError(f"{p} is a {_kind(st.st_mode)}, not a file")
        f.seek(offset)
        data = f.read(max_bytes + 1)
    truncated = len(data) > max_bytes
    data = data[:max_bytes]
    if b"\x00" in data:
        raise ToolError(f"{p} is binary (it holds NUL bytes); only text files are read")
    text = data.decode("utf-8", errors="replace")
    if truncated and text.endswith("\ufffd"):
        text = text[:-1]  # a character cut in two at the cap
    return {"path": p, "size": st.st_size, "offset": offset, "text": text, "truncated": truncated}


def _walk(root: str, max_depth: int) -> Iterator[tuple[str, os.DirEntry[str] | None, int]]:
    """Every entry under ``root`` (depth first, sorted), and unreadable directories (entry
    None: the error was the kernel's; they are counted, not fatal)."""
    stack = [(root, 0)]
    while stack:
        d, depth = stack.pop()
        try:
            with os.scandir(d) as it:
                found = sorted(it, key=lambda e: e.name, reverse=True)
        except OSError:
            yield d, None, depth
            continue
        subdirs = []
        for e in reversed(found):
            yield e.path, e, depth
            if depth < max_depth and e.is_dir(follow_symlinks=False):
                subdirs.append((e.path, depth + 1))
        stack.extend(reversed(subdirs))


def fs_search(
    path: str,
    name: str | None,
    contains: str | None,
    max_results: int,
    max_files: int,
    max_depth: int,
) -> dict[str, Any]:
    """Files under ``path`` whose name matches the glob ``name`` and whose text holds
    ``contains`` (each match with its first matching line), within the bounds given."""
    root = resolve(path)
    os.scandir(root).close()  # the kernel's error on the root itself (ENOENT, ENOTDIR, EACCES)
    needle = contains.encode() if contains else None
    results: list[dict[str, Any]] = []
    visited = unreadable = 0
    truncated = False
    for p, e, _ in _walk(root, max_depth):
        if e is None:
            unreadable += 1
            continue
        visited += 1
        if visited > max_files or len(results) >= max_results:
            truncated = True
            break
        if name is not None and not fnmatch.fnmatchcase(e.name, name):
            continue
        if needle is None:
            results.append({"path": p, "type": _kind(e.stat(follow_symlinks=False).st_mode)})
            continue
        if not e.is_file(follow_symlinks=False):
            continue
        try:
            with open(p, "rb") as f:
                data = f.read(SEARCH_FILE_BYTES)
        except OSError:
            unreadable += 1
            continue
        at = data.find(needle)
        if at < 0 or b"\x00" in data[:8192]:
            continue
        start = data.rfind(b"\n", 0, at) + 1
        end = data.find(b"\n", at)
        line = data[start : end if end >= 0 else len(data)][:400]
        results.append(
            {
                "path": p,
                "line": data.count(b"\n", 0, at) + 1,
                "text": line.decode("utf-8", errors="replace"),
            }
        )
    return {
        "path": root,
        "results": results,
        "files_visited": min(visited, max_files),
        "unreadable": unreadable,
        "truncated": truncated,
    }


def fs_du(path: str, max_files: int) -> dict[str, Any]:
    """Disk usage of a tree: bytes allocated, files and directories counted, like ``du -s``
    (each inode once, symlinks not followed, other file systems included)."""
    root = resolve(path)
    st = os.lstat(root)
    seen: set[tuple[int, int]] = {(st.st_dev, st.st_ino)}
    used = st.st_blocks * 512
    files = dirs = unreadable = 0
    truncated = False
    if stat.S_ISDIR(st.st_mode):
        dirs = 1
        os.scandir(root).close()  # the kernel's error on the root itself
        for _, e, _ in _walk(root, 1 << 30):
            if e is None:
                unreadable += 1
                continue
            if files + dirs >= max_files:
                truncated = True
                break
            try:
                s = e.stat(follow_symlinks=False)
            except OSError:
                unreadable += 1
                continue
            if (s.st_dev, s.st_ino) in seen:
                continue
            seen.add((s.st_dev, s.st_ino))
            used += s.st_blocks * 512
            if stat.S_ISDIR(s.st_mode):
                dirs += 1
            else:
                files += 1
    else:
        files = 1
    return {
        "path": root,
        "bytes": used,
        "files": files,
        "directories": dirs,
        "unreadable": unreadable,
        "truncated": truncated,
    }


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fs_write(path: str, content: str, mode: str) -> dict[str, Any]:
    """Write text to a file: ``create`` (it must not exist), ``overwrite`` (replaced whole,
    atomically: a reader sees the old file or the new one), or ``append``."""
    p = resolve(path)
    data = content.encode()
    if mode in ("create", "append"):
        flags = os.O_CREAT | os.O_EXCL if mode == "create" else os.O_APPEND
        fd = os.open(p, os.O_WRONLY | os.O_CLOEXEC | flags, 0o644)  # (umask 077: 0600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    elif mode == "overwrite":
        st = os.stat(p)  # it must exist, and the user must be able to see it
        if not stat.S_ISREG(st.st_mode):
            raise ToolError(f"{p} is a {_kind(st.st_mode)}, not a file")
        if not os.access(p, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), p)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(p), prefix=".aiosd-write-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    else:
        raise ToolError(f"mode {mode!r}: one of create, overwrite, append")
    return {"path": p, "mode": mode, "bytes_written": len(data), "size": os.stat(p).st_size}

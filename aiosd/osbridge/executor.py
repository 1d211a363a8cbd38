"""Running programs as a user: who the user is, and the command line that becomes them.

The root daemon never runs anything of a user's as root.  A program of a user's (an agent,
later a tool worker) is started through small wrappers from util-linux and coreutils that
each do one thing, in this order, so that every step after the first runs as the user:

1. ``setpriv`` (as root): real and effective uid and gid of the user, their supplementary
   groups as ``initgroups`` would set them, no capabilities left in any set, no new
   privileges (a setuid binary cannot elevate), and SIGKILL when the daemon dies;
2. ``env --chdir`` (as the user): the working directory, entered with the user's rights;
3. ``prlimit`` (as the user): resource limits, which a process may always lower;
4. ``nice`` (as the user): a lower CPU priority, when one is asked for;
5. the program.

The environment is given whole by the caller (nothing of the daemon's leaks in), stdin is
/dev/null, and the process gets a session of its own (``setsid``, done by ``subprocess`` in
C between fork and exec: no Python runs in the child of this threaded daemon).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pwd
import shutil
from collections.abc import Awaitable, Callable

from aiosd.errors import InvalidParams, NotFound

#: Exit statuses of the wrappers when they cannot go on (the program never ran): env's and
#: prlimit's conventions (125: the wrapper failed, 126: not executable, 127: not found).
WRAPPER_FAILED = {125, 126, 127}

#: PATH of a program started for a user: the system's, never the daemon's.
USER_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclasses.dataclass(frozen=True)
class UnixAccount:
    """A user as the kernel will see their processes: uid, primary gid, every group."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str

    @classmethod
    def of(cls, uid: int) -> UnixAccount:
        """The account of ``uid`` (NSS look-ups: call it off the event loop where NSS may be
        slow); NotFound if there is none."""
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            raise NotFound(f"uid {uid} has no user account") from None
        groups = tuple(sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid))))
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, groups, pw.pw_dir, pw.pw_shell)


@dataclasses.dataclass(frozen=True)
class ProcessLimits:
    """Limits applied by the kernel to one process (and inherited by its children)."""

    #: RLIMIT_AS, bytes of address space of each process (None: the daemon's own).
    address_space: int | None = None
    #: RLIMIT_NPROC: processes and threads the user may have; the kernel counts all of the
    #: user's, not only the agent's.
    processes: int | None = None
    #: RLIMIT_NOFILE: open files of each process.
    open_files: int | None = None
    #: RLIMIT_CORE: 0 keeps a crashing agent from writing its memory to a core file.
    core: int | None = 0
    #: nice value, 0 to 19 (None or 0: unchanged).
    nice: int | None = None


def _tool(name: str) -> str:
    found = shutil.which(name, path=USER_PATH)
    if found is None:
        raise NotFound(f"{name} is not installed (util-linux / coreutils): agents cannot start")
    return found


def confined_argv(
    account: UnixAccount, cwd: str, limits: ProcessLimits, argv: list[str]
) -> list[str]:
    """The command line that runs ``argv`` as ``account`` in ``cwd`` with ``limits``."""
    if account.uid == 0 or account.gid == 0:
        # Not even when root asks: an agent is a user's program.
        raise InvalidParams("programs are never started as root (uid 0 or gid 0)")
    if not argv or not argv[0]:
        raise InvalidParams("invalid params: argv: the program to run is missing")
    groups = ",".join(str(g) for g in account.groups)
    out = [
        _tool("setpriv"),
        f"--reuid={account.uid}",
        f"--regid={account.gid}",
        f"--groups={groups}" if groups else "--clear-groups",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--pdeathsig=KILL",
        "--",
        _tool("env"),
        f"--chdir={cwd}",
        "--",
    ]
    rl = [
        f"--as={limits.address_space}" if limits.address_space is not None else "",
        f"--nproc={limits.processes}" if limits.processes is not None else "",
        f"--nofile={limits.open_files}" if limits.open_files is not None else "",
        f"--core={limits.core}" if limits.core is not None else "",
    ]
    rl = [a for a in rl if a]
    if rl:
        out += [_tool("prlimit"), *rl, "--"]
    if limits.nice:
        out += [_tool("nice"), "-n", str(limits.nice), "--"]
    return out + argv


def user_environment(
    account: UnixAccount, extra: dict[str, str], fixed: dict[str, str]
) -> dict[str, str]:
    """A clean environment for ``account``: the login basics, then ``extra`` (the caller's),
    then ``fixed`` (the daemon's, which nobody overrides)."""
    env = {
        "HOME": account.home,
        "USER": account.name,
        "LOGNAME": account.name,
        "SHELL": account.shell or "/bin/sh",
        "PATH": USER_PATH,
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    env.update(fixed)
    return env


class AccountRef:
    """A user known by uid whose account (an NSS look-up: name, home, groups) is looked up
    only when something needs it (starting a process as them), once per reference: a call
    that a warm worker serves makes no look-up at all."""

    def __init__(self, uid: int, lookup: Callable[[int], Awaitable[UnixAccount]]) -> None:
        self.uid = uid
        self._lookup = lookup
        self._account: UnixAccount | None = None

    async def get(self) -> UnixAccount:
        """The account (looked up the first time)."""
        if self._account is None:
            self._account = await self._lookup(self.uid)
        return self._account


#: Open files of a user's helper process (tool worker, MCP server) at most.
HELPER_OPEN_FILES = 1024


async def start_piped(
    account: UnixAccount, argv: list[str], env: dict[str, str], limit: int
) -> asyncio.subprocess.Process:
    """Start ``argv`` as ``account`` with pipes on stdin, stdout and stderr: a user's helper
    process (a tool worker, an MCP server), confined like an agent, in its own session, in
    ``/`` (it enters the home itself), umask 077; ``limit`` bounds one line read from it.
    Call it on the event loop's thread: the parent-death signal is tied to the thread that
    forks.  OSError if it cannot be started."""
    full = confined_argv(account, "/", ProcessLimits(core=0, open_files=HELPER_OPEN_FILES), argv)
    return await asyncio.create_subprocess_exec(
        *full,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd="/",
        start_new_session=True,
        close_fds=True,
        umask=0o077,
        limit=limit,
    )

"""Installed agents: one directory with an ``agent.toml`` each.

Found in the agents shipped with aiosd (``aiosd/agents/``), in ``[agents] directories`` (for
the system's packaged agents, read by the daemon: they belong to root), and in the user's own
``~/.local/share/aiosd/agents/``, which is read **as the user** by a short-lived process of
theirs (the root daemon never reads a user's files), so a user's manifest is exactly what
that user can read.  A user's agent hides a system one of the same name.

``agent.toml``::

    name = "summarize"                  # a-z 0-9 _ . -, the name agent.spawn takes
    description = "Summarise the text files of a folder into your storage"
    exec = ["{python}", "-m", "aiosd.agents.summarize"]   # {python}: the daemon's Python;
                                        # {dir}: this manifest's directory
    tools = ["files.read"]              # optional: the tools it may use
    priority = "batch"                  # optional: interactive, normal, batch
    memory_budget = 1048576             # optional: bytes of short-term memory
    [limits]                            # optional: memory_max, tasks_max, runtime_max,
    memory_max = 268435456              #           cpu_weight
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from aiosd.errors import NotFound
from aiosd.kernel.scheduler import Priority
from aiosd.osbridge.executor import ProcessLimits, UnixAccount, confined_argv, user_environment

log = logging.getLogger(__name__)

#: The agents that come with aiosd.
BUILTIN = Path(__file__).resolve().parent.parent / "agents"
#: Where a user keeps their own agents, under their home.
USER_DIR = ".local/share/aiosd/agents"
#: Bounds of what is read of one directory of manifests.
MAX_MANIFESTS = 64
MAX_MANIFEST_BYTES = 64 * 1024
#: How long the user's reader may take.
READ_TIMEOUT = 10.0

#: Run as the user: print {directory name: agent.toml text} of the agents under argv[1].
_READER = f"""
import json, os, sys
out = {{}}
try:
    names = sorted(os.listdir(sys.argv[1]))
except OSError:
    names = []
for n in names[:{MAX_MANIFESTS}]:
    try:
        with open(os.path.join(sys.argv[1], n, "agent.toml"), "rb") as f:
            out[n] = f.read({MAX_MANIFEST_BYTES} + 1).decode("utf-8", "replace")
    except OSError:
        pass
json.dump(out, sys.stdout)
"""


class LimitsParams(BaseModel):
    """Limits asked for an agent (in agent.spawn, or in its agent.toml); None: the default."""

    model_config = ConfigDict(extra="forbid")

    memory_max: Annotated[int, Field(ge=0, le=1 << 50)] | None = None
    tasks_max: Annotated[int, Field(ge=0, le=1 << 22)] | None = None
    runtime_max: Annotated[float, Field(ge=0, le=1 << 31)] | None = None
    cpu_weight: Annotated[int, Field(ge=1, le=10000)] | None = None


class _File(BaseModel):
    """What an agent.toml may hold."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.\-]{0,63}$")]
    description: Annotated[str, Field(max_length=1024)] = ""
    exec: Annotated[list[Annotated[str, Field(max_length=4096)]], Field(min_length=1)]
    tools: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = None
    priority: Priority | None = None
    memory_budget: Annotated[int, Field(ge=0, le=1 << 40)] | None = None
    limits: LimitsParams = LimitsParams()


@dataclasses.dataclass(frozen=True)
class Manifest:
    """An installed agent."""

    name: str
    description: str
    exec: list[str]
    directory: str
    source: str  # "builtin", "system" or "user"
    tools: list[str] | None
    priority: Priority | None
    memory_budget: int | None
    limits: LimitsParams

    def argv(self) -> list[str]:
        """The command line, placeholders filled in."""
        return [
            a.replace("{python}", sys.executable).replace("{dir}", self.directory)
            for a in self.exec
        ]

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "exec": self.argv(),
            "source": self.source,
            "tools": self.tools,
            "priority": self.priority.value if self.priority else None,
            "memory_budget": self.memory_budget,
            "limits": self.limits.model_dump(),
        }


def parse(text: str, directory: str, source: str) -> Manifest:
    """One agent.toml; ValueError naming what is wrong with it."""
    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise ValueError(f"more than {MAX_MANIFEST_BYTES} bytes")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"not TOML: {exc}") from None
    try:
        f = _File.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(x) for x in first["loc"]) or "(file)"
        raise ValueError(f"{where}: {first['msg']}") from None
    return Manifest(
        name=f.name,
        description=f.description,
        exec=f.exec,
        directory=directory,
        source=source,
        tools=f.tools,
        priority=f.priority,
        memory_budget=f.memory_budget,
        limits=f.limits,
    )


class Manifests:
    """Finds installed agents: the built-in and system ones, and each user's own."""

    def __init__(self, directories: list[str]) -> None:
        self.directories = [BUILTIN, *(Path(d) for d in directories)]

    def _system(self) -> tuple[dict[str, Manifest], list[str]]:
        found: dict[str, Manifest] = {}
        problems: list[str] = []
        for base in self.directories:
            source = "builtin" if base == BUILTIN else "system"
            try:
                entries = sorted(p for p in base.iterdir() if (p / "agent.toml").is_file())
            except OSError:
                continue
            for d in entries[:MAX_MANIFESTS]:
                try:
                    m = parse((d / "agent.toml").read_text(errors="replace"), str(d), source)
                except (OSError, ValueError) as exc:
                    problems.append(f"{d / 'agent.toml'}: {exc}")
                    continue
                found.setdefault(m.name, m)
        return found, problems

    async def _users(self, account: UnixAccount) -> tuple[dict[str, Manifest], list[str]]:
        base = f"{account.home.rstrip('/')}/{USER_DIR}"
        argv = confined_argv(
            account,
            "/",
            ProcessLimits(core=0),
            [sys.executable, "-I", "-S", "-c", _READER, base],
        )
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=user_environment(account, {}, {}),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), READ_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return {}, [f"{base}: reading it as {account.name} took over {READ_TIMEOUT:g} s"]
        if proc.returncode != 0:
            return {}, [f"{base}: cannot be read as {account.name}: {err.decode()[-200:]}"]
        found: dict[str, Manifest] = {}
        problems: list[str] = []
        for dirname, text in json.loads(out or b"{}").items():
            try:
                m = parse(text, f"{base}/{dirname}", "user")
            except ValueError as exc:
                problems.append(f"{base}/{dirname}/agent.toml: {exc}")
                continue
            found.setdefault(m.name, m)
        return found, problems

    async def all(self, account: UnixAccount) -> tuple[list[Manifest], list[str]]:
        """Every agent ``account`` may start by name, and what was wrong with the others."""
        system, problems = await asyncio.to_thread(self._system)
        # Root has no agents of its own (they never run as root): only the system's.
        mine, theirs = await self._users(account) if account.uid != 0 else ({}, [])
        merged = {**system, **mine}
        return sorted(merged.values(), key=lambda m: m.name), problems + theirs

    async def find(self, account: UnixAccount, name: str) -> Manifest:
        """The installed agent ``name`` for ``account``; NotFound if there is none."""
        found, problems = await self.all(account)
        for m in found:
            if m.name == name:
                return m
        hint = f" ({'; '.join(problems)})" if problems else ""
        raise NotFound(f"no installed agent named {name!r}; see agent.available{hint}")

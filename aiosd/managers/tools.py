"""The tool manager: one registry of tools, one path to call them, and consent.

A tool has a name (``fs.read``), a description, its arguments as a pydantic model (whose
JSON schema is what callers and models see), and annotations (read-only, destructive,
open-world) that policy reads.  Every call, from ``tool.call`` or from the tool loop of
``llm.chat``, takes :meth:`ToolManager.call`:

1. the tool must exist and be one the caller may use (not in ``tools.deny``; for an agent,
   in its allowed-tools list, if it has one) — otherwise NotFound, as for no such tool;
2. the arguments are validated against the tool's model (InvalidParams naming the field);
3. consent: when policy says the call needs the user's yes (``tools.confirm``,
   ``tools.always_confirm``) and no grant of the user's covers it, a confirmation request is
   made and the call waits for ``tool.confirm`` from that user (never from an agent, never
   from anyone else); no answer within ``tools.confirm_timeout`` is no;
4. the tool runs for the caller: work on files, processes and the desktop in the caller's
   own worker process, as the caller (:mod:`aiosd.osbridge.workers`); views that need no
   user's rights in the daemon; storage and memory tools as the caller's own syscalls;
5. the result is bounded (``tools.max_output_bytes``) and audited with the caller, the
   agent, the tool and a digest of the arguments.

A tool that fails is a result with ``ok: false`` and an error that says whose refusal it was
(the kernel's ``EACCES`` is reported as such), so a model in the tool loop can read it;
refusals by the daemon (unknown tool, bad arguments, no consent) are errors of the call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import hashlib
import json
import logging
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from aiosd.config import ToolsConfig
from aiosd.errors import Busy, InvalidParams, NotFound, PermissionDenied
from aiosd.managers.access import AccessManager, Caller, Role
from aiosd.managers.storage import StorageManager
from aiosd.osbridge.executor import AccountRef
from aiosd.osbridge.workers import WorkerFailed, WorkerPool

log = logging.getLogger(__name__)

#: Where a user's lasting grants are kept in their storage ("_": no syscall can name it).
GRANTS_COLLECTION = "_tools"
GRANTS_KEY = "grants"

Remember = Literal["once", "session", "always"]


@dataclasses.dataclass(frozen=True)
class Annotations:
    """What a tool does, as policy reads it (the names of MCP's tool annotations)."""

    #: It changes nothing.
    read_only: bool
    #: It may change or delete something that cannot be had back (a write, a signal).
    destructive: bool = False
    #: It reaches beyond the machine (the network).
    open_world: bool = False
    #: Calling it twice with the same arguments does no more than once.
    idempotent: bool = False

    def as_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Context:
    """One call of a tool: for whom, with what rights, within what time."""

    caller: Caller
    account: AccountRef
    admin: bool
    timeout: float
    workers: WorkerPool
    #: Runs a syscall as the caller (storage and memory tools).
    syscall: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]

    async def in_worker(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run ``op`` in the caller's worker, as the caller: its result, or ToolFailure."""
        try:
            reply = await self.workers.call(self.account, self.admin, op, args, self.timeout)
        except WorkerFailed as exc:
            kind = "timeout" if exc.timed_out else "worker"
            raise ToolFailure(kind, f"the tool worker failed: {exc}") from None
        if "error" in reply:
            e = reply["error"]
            if e.get("kind") == "os":
                where = f"{e['path']}: " if e.get("path") else ""
                name = (await self.account.get()).name
                raise ToolFailure(
                    "os",
                    f"{where}{e['message']} ({e['code']}): the kernel refused it for {name}"
                    if e.get("code") in ("EACCES", "EPERM")
                    else f"{where}{e['message']} ({e['code']})",
                    errno=e.get("errno"),
                    code=e.get("code"),
                    path=e.get("path"),
                )
            if e.get("kind") == "internal":
                log.warning("tool worker of uid %d failed at %s: %s", self.account.uid, op, e)
            raise ToolFailure(str(e.get("kind", "tool")), str(e.get("message", "")))
        result: dict[str, Any] = reply["result"]
        return result


class ToolFailure(Exception):
    """A tool could not do what was asked: an ``ok: false`` result, not a refused call."""

    def __init__(self, kind: str, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.detail = {k: v for k, v in detail.items() if v is not None}

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, **self.detail}


Run = Callable[[Context, Any], Awaitable[dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Tool:
    """One tool of the registry."""

    name: str
    description: str
    #: The arguments' model (built-in tools); its JSON schema is the tool's.
    args: type[BaseModel] | None
    annotations: Annotations
    run: Run
    #: "builtin", or where it comes from ("mcp:SERVER").
    source: str = "builtin"
    #: It runs as the caller, in their worker or as their process (so never for root).
    as_user: bool = False
    #: The arguments' JSON schema, for a tool without a model (an MCP server's).
    json_schema: dict[str, Any] | None = None

    def schema(self) -> dict[str, Any]:
        """The JSON schema of the arguments (no titles: they only repeat the names)."""
        if self.args is None:
            return self.json_schema or {"type": "object"}
        return _schema_of(self.args)

    def validate(self, arguments: dict[str, Any]) -> Any:
        """The arguments checked against the schema (the model, parsed); InvalidParams
        naming the first fault."""
        if self.args is not None:
            try:
                return self.args.model_validate(arguments)
            except ValidationError as exc:
                first = exc.errors(include_url=False, include_input=False)[0]
                where = ".".join(str(p) for p in first["loc"]) or "(arguments)"
                raise InvalidParams(
                    f"invalid params: arguments.{where}: {first['msg']} (tool {self.name})"
                ) from None
        import jsonschema

        validator = _VALIDATORS.get(id(self))
        if validator is None:
            validator = _VALIDATORS[id(self)] = jsonschema.Draft202012Validator(self.schema())
            weakref.finalize(self, _VALIDATORS.pop, id(self), None)
        error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "(arguments)"
            raise InvalidParams(
                f"invalid params: arguments.{where}: {error.message} (tool {self.name})"
            )
        return arguments

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "parameters": self.schema(),
            "annotations": self.annotations.as_dict(),
            "source": self.source,
            "runs_as": "caller" if self.as_user else "daemon",
        }


_SCHEMAS: dict[type[BaseModel], dict[str, Any]] = {}
#: A JSON-schema tool's validator, made once (by the tool's id while it lives).
_VALIDATORS: dict[int, Any] = {}


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    if model not in _SCHEMAS:
        schema = model.model_json_schema()

        def strip(node: Any) -> Any:
            if isinstance(node, dict):
                return {k: strip(v) for k, v in node.items() if k != "title"}
            if isinstance(node, list):
                return [strip(v) for v in node]
            return node

        _SCHEMAS[model] = strip(schema)
    return _SCHEMAS[model]


def digest(arguments: dict[str, Any]) -> str:
    """A short, stable digest of a call's arguments, for the audit log."""
    canon = json.dumps(arguments, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8", "replace")).hexdigest()[:16]


def matches(name: str, patterns: list[str]) -> bool:
    """Whether ``name`` is one of ``patterns`` (names or shell globs such as ``fs.*``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclasses.dataclass
class Pending:
    """A confirmation request: a call waiting for its user's yes or no."""

    id: str
    uid: int
    aid: str | None
    session: str | None
    tool: str
    arguments: dict[str, Any]
    annotations: dict[str, bool]
    created: float
    expires: float
    answer: asyncio.Future[tuple[bool, Remember]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tool": self.tool,
            "arguments": self.arguments,
            "annotations": self.annotations,
            "aid": self.aid,
            "created": self.created,
            "expires": self.expires,
        }


class ToolManager:
    """The registry, the call path and the consent layer."""

    def __init__(
        self,
        cfg: Callable[[], ToolsConfig],
        workers: WorkerPool,
        storage: StorageManager,
        access: AccessManager,
        allowed_for: Callable[[Caller], list[str] | None],
    ) -> None:
        self._cfg = cfg
        self.workers = workers
        self.storage = storage
        self.access = access
        #: caller → the tools its agent may use (None: any).
        self._allowed_for = allowed_for
        self._tools: dict[str, Tool] = {}
        self._pending: dict[str, Pending] = {}
        #: (uid, session) → tools granted for that client session.
        self._session_grants: dict[tuple[int, str], set[str]] = {}
        #: uid → tools granted for good (a copy of what their storage holds).
        self._lasting: dict[int, set[str]] = {}
        #: Told of every new confirmation request (the D-Bus front-end signals its owner).
        self.on_confirmation: list[Callable[[Pending], None]] = []
        #: caller → tools beyond the built-in ones, and problems (MCP servers).
        self.sources: Callable[[Caller, bool], Awaitable[tuple[list[Tool], list[str]]]] | None = (
            None
        )
        #: Run when the manager closes (the MCP servers stop).
        self.on_close: list[Callable[[], Awaitable[None]]] = []

    # --- the registry -----------------------------------------------------------------------

    def add(self, tool: Tool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"tool {tool.name!r} is registered twice")
        self._tools[tool.name] = tool

    async def usable(self, caller: Caller, fresh: bool = True) -> list[Tool]:
        """The tools ``caller`` may use, by name: the built-in ones and those of the MCP
        servers configured for them (started as they are needed)."""
        return (await self.listing(caller, fresh))[0]

    async def listing(self, caller: Caller, fresh: bool = True) -> tuple[list[Tool], list[str]]:
        """The tools ``caller`` may use, and the problems met finding them (an MCP server
        that would not start, a tool with an unusable schema).  ``fresh`` false: a listing
        of MCP tools a few seconds old will do (calls of one tool)."""
        tools = dict(self._tools)
        problems: list[str] = []
        if self.sources is not None and caller.uid != 0:
            found, problems = await self.sources(caller, fresh)
            for t in found:
                tools.setdefault(t.name, t)
        deny = self._cfg().deny
        allowed = self._allowed_for(caller)
        usable = [
            t
            for name, t in sorted(tools.items())
            if not matches(name, deny) and (allowed is None or matches(name, allowed))
        ]
        return usable, problems

    async def get(self, name: str, caller: Caller) -> Tool:
        """A tool the caller may use; NotFound (the same for every reason) otherwise."""
        builtin = self._tools.get(name)
        allowed = self._allowed_for(caller)
        if builtin is not None:  # (no MCP server is touched for a built-in tool)
            if not matches(name, self._cfg().deny) and (allowed is None or matches(name, allowed)):
                return builtin
        elif self.sources is not None and caller.uid != 0:
            found, _ = await self.sources(caller, False)
            for tool in found:
                if tool.name == name and not matches(name, self._cfg().deny):
                    if allowed is None or matches(name, allowed):
                        return tool
        raise NotFound(f"no tool {name!r} that you may use (see tool.list)")

    # --- calls ------------------------------------------------------------------------------

    async def call(
        self,
        caller: Caller,
        account: AccountRef,
        name: str,
        arguments: dict[str, Any],
        *,
        timeout: float | None,
        syscall: Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]],
        ask: Callable[[Pending], Awaitable[None]] | None,
        via: str = "tool.call",
    ) -> dict[str, Any]:
        """Call one tool for ``caller``: ``{tool, ok, output | error, elapsed_ms}``.

        Raises NotFound, InvalidParams, PermissionDenied (no consent) and Busy before the
        tool runs; a tool that runs and fails is a result with ``ok: false``.  ``ask``
        delivers a confirmation request to the waiting client (a stream notification).
        """
        cfg = self._cfg()
        tool = await self.get(name, caller)
        args = tool.validate(arguments)
        admin = self.access.role(caller) is Role.admin
        record = f"tool={name} args=sha256:{digest(arguments)} via={via}"
        if tool.as_user and account.uid == 0:
            self.access.audit(caller, "tool.run", "refused:root", record)
            raise PermissionDenied(
                f"tool {name} runs as the user who calls it, and never as root: "
                "call it as an ordinary user"
            )
        if await self.needs_consent(tool, caller):
            await self._consent(caller, tool, arguments, ask, record)
        ctx = Context(
            caller=caller,
            account=account,
            admin=admin,
            timeout=min(timeout or cfg.call_timeout, cfg.call_timeout),
            workers=self.workers,
            syscall=syscall,
        )
        t0 = time.perf_counter()
        out: dict[str, Any] = {"tool": name}
        try:
            output = await tool.run(ctx, args)
            size = len(json.dumps(output, ensure_ascii=False).encode("utf-8", "replace"))
            if size > cfg.max_output_bytes:
                raise ToolFailure(
                    "output",
                    f"its result of {size} bytes is over tools.max_output_bytes "
                    f"({cfg.max_output_bytes}): ask for less",
                )
            out.update(ok=True, output=output)
            verdict = "ok"
        except ToolFailure as exc:
            out.update(ok=False, error=exc.as_dict())
            verdict = f"failed:{exc.kind}"
        out["elapsed_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        self.access.audit(caller, "tool.run", verdict, record)
        return out

    # --- consent ----------------------------------------------------------------------------

    async def needs_consent(self, tool: Tool, caller: Caller) -> bool:
        """Whether calling ``tool`` now waits for the user's yes."""
        cfg = self._cfg()
        if matches(tool.name, cfg.always_confirm):
            return True
        a = tool.annotations
        if cfg.confirm == "none":
            return False
        if cfg.confirm == "destructive" and not a.destructive:
            return False
        if cfg.confirm == "write" and a.read_only:
            return False
        if caller.session is not None and tool.name in self._session_grants.get(
            (caller.uid, caller.session), set()
        ):
            return False
        return tool.name not in await self.lasting(caller.uid)

    async def _consent(
        self,
        caller: Caller,
        tool: Tool,
        arguments: dict[str, Any],
        ask: Callable[[Pending], Awaitable[None]] | None,
        record: str,
    ) -> None:
        cfg = self._cfg()
        mine = sum(1 for p in self._pending.values() if p.uid == caller.uid)
        if mine >= cfg.max_pending_per_user:
            self.access.audit(caller, "tool.confirm", "refused:busy", record)
            raise Busy(
                f"{mine} of your tool calls already wait for your confirmation "
                "(tools.max_pending_per_user)"
            )
        now = time.time()
        p = Pending(
            id=secrets.token_hex(8),
            uid=caller.uid,
            aid=caller.aid,
            session=caller.session,
            tool=tool.name,
            arguments=arguments,
            annotations=tool.annotations.as_dict(),
            created=now,
            expires=now + cfg.confirm_timeout,
            answer=asyncio.get_running_loop().create_future(),
        )
        self._pending[p.id] = p
        self.access.audit(caller, "tool.confirm", "asked", f"{record} request={p.id}")
        try:
            for listener in list(self.on_confirmation):
                try:
                    listener(p)
                except Exception:
                    log.exception("a confirmation listener failed")
            if ask is not None:
                await ask(p)
            try:
                async with asyncio.timeout(cfg.confirm_timeout):
                    allowed, remember = await p.answer
            except TimeoutError:
                self.access.audit(caller, "tool.confirm", "refused:timeout", record)
                raise PermissionDenied(
                    f"tool {tool.name} was not run: no answer to confirmation request {p.id} "
                    f"within {cfg.confirm_timeout:g} s (tools.confirm_timeout)",
                    data={"request": p.id, "reason": "timeout"},
                ) from None
        finally:
            del self._pending[p.id]
        if not allowed:
            self.access.audit(caller, "tool.confirm", "refused:declined", record)
            raise PermissionDenied(
                f"tool {tool.name} was not run: you declined confirmation request {p.id}",
                data={"request": p.id, "reason": "declined"},
            )
        self.access.audit(caller, "tool.confirm", f"allowed:{remember}", record)

    def pending(self, caller: Caller) -> list[Pending]:
        """The caller's confirmation requests, oldest first."""
        return sorted(
            (p for p in self._pending.values() if p.uid == caller.uid), key=lambda p: p.created
        )

    async def confirm(
        self, caller: Caller, request: str, allow: bool, remember: Remember
    ) -> Pending:
        """Answer a confirmation request: only its user, and not from one of their agents."""
        p = self._pending.get(request)
        if p is None or p.uid != caller.uid:
            raise NotFound(f"no confirmation request {request!r} of yours is waiting")
        if caller.aid is not None:
            raise PermissionDenied(
                "agents cannot answer confirmation requests: you answer them yourself "
                "(aiosctl tool confirm, or the desktop)"
            )
        if p.answer.done():
            raise NotFound(f"confirmation request {request!r} has been answered already")
        if allow and remember == "session" and p.session is not None:
            self._session_grants.setdefault((p.uid, p.session), set()).add(p.tool)
        if allow and remember == "always":
            await self.grant(caller.uid, p.tool)
        p.answer.set_result((allow, remember))
        return p

    def session_closed(self, caller: Caller) -> None:
        """A client session ended: its grants go."""
        if caller.session is not None:
            self._session_grants.pop((caller.uid, caller.session), None)

    async def lasting(self, uid: int) -> set[str]:
        """The tools ``uid`` has allowed for good (kept in their storage)."""
        if uid not in self._lasting:
            if not self.storage.exists(uid):
                self._lasting[uid] = set()
            else:

                def read(s: Any) -> set[str]:
                    try:
                        v = s.get(GRANTS_COLLECTION, GRANTS_KEY, None)
                    except NotFound:
                        return set()
                    return set(json.loads(v["value"]).get("always", []))

                self._lasting[uid] = await self.storage.run(uid, read)
        return self._lasting[uid]

    async def _store(self, uid: int, tools: set[str]) -> None:
        value = json.dumps({"always": sorted(tools)}).encode()
        await self.storage.run(uid, lambda s: s.put(GRANTS_COLLECTION, GRANTS_KEY, value, True, {}))
        self._lasting[uid] = set(tools)

    async def grant(self, uid: int, tool: str) -> None:
        """Allow ``tool`` for good for ``uid``."""
        tools = set(await self.lasting(uid))
        if tool not in tools:
            await self._store(uid, tools | {tool})

    async def revoke(self, caller: Caller, tool: str | None) -> list[str]:
        """Take back lasting and session grants (one tool, or all): what was taken back."""
        if caller.aid is not None:
            raise PermissionDenied("agents cannot change your tool grants")
        had = set(await self.lasting(caller.uid))
        gone = had if tool is None else had & {tool}
        if gone:
            await self._store(caller.uid, had - gone)
        for (uid, _), tools in self._session_grants.items():
            if uid == caller.uid:
                taken = set(tools) if tool is None else tools & {tool}
                gone |= taken
                tools -= taken
        return sorted(gone)

    async def grants(self, caller: Caller) -> dict[str, list[str]]:
        """The caller's grants: lasting ones, and those of their current session."""
        session = (
            self._session_grants.get((caller.uid, caller.session), set())
            if caller.session
            else set()
        )
        return {"always": sorted(await self.lasting(caller.uid)), "session": sorted(session)}

    async def close(self) -> None:
        for p in list(self._pending.values()):
            if not p.answer.done():
                p.answer.set_result((False, "once"))
        for step in self.on_close:
            await step()
        await self.workers.close()

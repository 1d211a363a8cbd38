"""The ``tool.*`` syscalls: the tools a caller may use, calling them, and consent.

Every tool runs for the caller with the caller's rights (``managers/tools.py``).  A call that
needs the user's yes waits for ``tool.confirm``; with ``stream: true`` the request arrives as a
notification of the waiting call (``{"confirm": {...}}``), and ``tool.pending`` lists the
requests waiting for the caller from anywhere (an agent's calls, another terminal).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from pydantic import Field

from aiosd.kernel.syscall_base import Emit, Params, Result, syscall
from aiosd.managers.access import Caller, Permission
from aiosd.managers.tools import Pending, Tool, ToolManager
from aiosd.managers.users import UserDirectory
from aiosd.osbridge.executor import AccountRef

ToolName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.\-]+$")]
RequestId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
#: Runs a syscall as a caller (the kernel's dispatch).
Dispatch = Callable[[str, dict[str, Any], Caller], Awaitable[dict[str, Any]]]


class NoParams(Params):
    """No parameters."""


class NameParams(Params):
    """A tool (``tool.describe``)."""

    name: ToolName


class CallParams(Params):
    """Parameters of ``tool.call``."""

    name: ToolName
    #: The tool's arguments, checked against its schema (``tool.describe``).
    arguments: Annotated[dict[str, Any], Field(max_length=256)] = {}
    #: Seconds the tool may take (at most tools.call_timeout, the default).
    timeout: Annotated[float, Field(gt=0, le=3600)] | None = None
    #: Send confirmation requests for this call as notifications.
    stream: bool = False


class ConfirmParams(Params):
    """Parameters of ``tool.confirm``."""

    request: RequestId
    allow: bool
    #: once: this call only; session: this tool, for the asking client session; always:
    #: this tool for good (kept in your storage; tool.revoke takes it back).
    remember: Literal["once", "session", "always"] = "once"


class RevokeParams(Params):
    """Parameters of ``tool.revoke``."""

    #: The tool whose grants go (default: every tool's).
    name: ToolName | None = None


class ToolInfo(Result):
    """A tool, as ``tool.list`` and ``tool.describe`` show it."""

    name: str
    description: str
    #: The JSON schema of its arguments.
    parameters: dict[str, Any]
    #: read_only, destructive, open_world, idempotent.
    annotations: dict[str, bool]
    source: str
    #: "caller": it runs in your own worker process, as you; "daemon": in the daemon.
    runs_as: str
    #: Whether a call of it now would wait for your confirmation.
    needs_confirmation: bool


class ListResult(Result):
    """Result of ``tool.list``: the tools, and what kept others from being listed (an MCP
    server that would not start, a tool whose schema cannot be used)."""

    tools: list[ToolInfo]
    problems: list[str]


class CallResult(Result):
    """Result of ``tool.call``: ``output`` when ``ok``, else ``error`` (kind, message; for a
    refusal of the kernel's, errno, code and path)."""

    tool: str
    ok: bool
    output: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    elapsed_ms: float


class PendingInfo(Result):
    """A confirmation request."""

    id: str
    tool: str
    arguments: dict[str, Any]
    annotations: dict[str, bool]
    aid: str | None
    created: float
    expires: float


class PendingResult(Result):
    """Result of ``tool.pending``."""

    requests: list[PendingInfo]


class ConfirmResult(Result):
    """Result of ``tool.confirm``."""

    request: str
    tool: str
    allowed: bool
    remember: str


class GrantsResult(Result):
    """Result of ``tool.grants``: tools allowed for good, and for this client session."""

    always: list[str]
    session: list[str]


class RevokeResult(Result):
    """Result of ``tool.revoke``: the tools whose grants were taken back."""

    revoked: list[str]


def confirm_note(p: Pending) -> dict[str, Any]:
    """The notification that carries a confirmation request to the waiting client."""
    return {"confirm": p.as_dict()}


class ToolSyscalls:
    """Handlers of ``tool.*``: the tool manager and the user directory."""

    def __init__(self, tools: ToolManager, users: UserDirectory, dispatch: Dispatch) -> None:
        self.tools = tools
        self.users = users
        self._dispatch = dispatch

    async def _info(self, t: Tool, c: Caller) -> ToolInfo:
        return ToolInfo(**t.describe(), needs_confirmation=await self.tools.needs_consent(t, c))

    @syscall("tool.list", NoParams, ListResult, Permission.user, "The tools you may use.")
    async def list(self, p: NoParams, c: Caller, emit: Emit | None) -> Result:
        """``tool.list``."""
        tools, problems = await self.tools.listing(c)
        return ListResult(tools=[await self._info(t, c) for t in tools], problems=problems)

    @syscall("tool.describe", NameParams, ToolInfo, Permission.user, "One tool, with its schema.")
    async def describe(self, p: NameParams, c: Caller, emit: Emit | None) -> Result:
        """``tool.describe``."""
        return await self._info(await self.tools.get(p.name, c), c)

    @syscall(
        "tool.call",
        CallParams,
        CallResult,
        Permission.user,
        "Run one tool as yourself; one that needs your yes waits for tool.confirm.",
        streams=True,
    )
    async def call(self, p: CallParams, c: Caller, emit: Emit | None) -> Result:
        """``tool.call``."""
        account = AccountRef(c.uid, self.users.account)

        async def ask(pending: Pending) -> None:
            if emit is not None and p.stream:
                await emit(confirm_note(pending))

        async def run(name: str, params: dict[str, Any]) -> dict[str, Any]:
            return await self._dispatch(name, params, c)

        out = await self.tools.call(
            c, account, p.name, p.arguments, timeout=p.timeout, syscall=run, ask=ask
        )
        return CallResult(**out)

    @syscall(
        "tool.pending",
        NoParams,
        PendingResult,
        Permission.user,
        "Your tool calls waiting for your confirmation.",
    )
    def pending(self, p: NoParams, c: Caller, emit: Emit | None) -> Result:
        """``tool.pending``."""
        return PendingResult(requests=[PendingInfo(**x.as_dict()) for x in self.tools.pending(c)])

    @syscall(
        "tool.confirm",
        ConfirmParams,
        ConfirmResult,
        Permission.user,
        "Answer a confirmation request of yours (not from an agent).",
    )
    async def confirm(self, p: ConfirmParams, c: Caller, emit: Emit | None) -> Result:
        """``tool.confirm``."""
        done = await self.tools.confirm(c, p.request, p.allow, p.remember)
        return ConfirmResult(request=done.id, tool=done.tool, allowed=p.allow, remember=p.remember)

    @syscall(
        "tool.grants",
        NoParams,
        GrantsResult,
        Permission.user,
        "The tools you allowed for good, and for this session.",
    )
    async def grants(self, p: NoParams, c: Caller, emit: Emit | None) -> Result:
        """``tool.grants``."""
        return GrantsResult(**await self.tools.grants(c))

    @syscall(
        "tool.revoke",
        RevokeParams,
        RevokeResult,
        Permission.user,
        "Take back your grants of a tool (or of every tool).",
    )
    async def revoke(self, p: RevokeParams, c: Caller, emit: Emit | None) -> Result:
        """``tool.revoke``."""
        return RevokeResult(revoked=await self.tools.revoke(c, p.name))

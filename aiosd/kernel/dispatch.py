"""The one path every request takes: validate → authorize → route → audit.

:class:`SyscallPath` holds what the path needs (the access manager and the bound syscall
table) and nothing more; :meth:`aiosd.kernel.kernel.Kernel.dispatch` is its only caller.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Coroutine, Mapping
from typing import Any, cast

from pydantic import ValidationError

from aiosd.errors import AiosError, InternalError, InvalidParams, MethodNotFound
from aiosd.kernel.syscall_base import Emit, Params, Result, Syscall, bind
from aiosd.managers.access import AccessManager, Caller, Role

log = logging.getLogger(__name__)


def invalid_params(exc: ValidationError) -> InvalidParams:
    """Turn a pydantic error into InvalidParams naming every field path."""
    errors = [
        {"field": _field(e), "message": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return InvalidParams(
        f"invalid params: {first['field']}: {first['message']}{more}", data={"errors": errors}
    )


def _field(error: Any) -> str:
    return ".".join(str(p) for p in error["loc"]) or "(params)"


#: What :meth:`SyscallPath.run` returns: the JSON-ready result when the syscall finished
#: without waiting, else a coroutine that runs the handler and finishes the path.
Outcome = dict[str, Any] | Coroutine[Any, Any, dict[str, Any]]


class SyscallPath:
    """Validates, authorizes, routes and audits syscalls of one table."""

    def __init__(
        self, access: AccessManager, table: Mapping[str, Syscall], families: Mapping[type, object]
    ) -> None:
        self.access = access
        self._bound = bind(table, families)

    def run(self, name: str, params: Any, caller: Caller, emit: Emit | None) -> Outcome:
        """Run syscall ``name`` for ``caller``: its result, or a coroutine for it; raise AiosError.

        A syscall whose handler answers at once (``system.status``) completes here, with no
        task and no await; one that waits (``llm.chat``) returns the rest of this path.
        """
        access = self.access
        role = access.role(caller)
        if role is Role.none:
            # Callers with no role learn nothing, not even which syscalls or params exist.
            refusal = access.refusal(caller)
            access.audit(caller, name[:64], "denied", refusal.message)
            raise refusal
        bound = self._bound.get(name)
        if bound is None:
            access.audit(caller, name[:64], "unknown")
            raise MethodNotFound(f"no syscall named {name[:64]!r}")
        spec, family = bound
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InvalidParams("invalid params: params must be an object (named parameters)")
        try:
            p = spec.params.model_validate(params)
        except ValidationError as exc:
            err = invalid_params(exc)
            access.audit(caller, name, "invalid", err.message)
            raise err from None
        try:
            access.authorize(name, spec.permission, role)
        except AiosError as exc:
            access.audit(caller, name, "denied", exc.message)
            raise
        if not spec.streams:
            emit = None
        if spec.waits:
            # The handler's coroutine is made inside _finish, so a request cancelled before
            # it starts leaves no coroutine behind that was never awaited.
            return self._finish(spec, family, p, caller, emit)
        try:
            result = spec.handler(family, p, caller, emit)
        except Exception as exc:
            raise self._failed(name, caller, exc) from None
        return self._done(spec, caller, cast(Result, result))

    async def _finish(
        self, spec: Syscall, family: object, p: Params, caller: Caller, emit: Emit | None
    ) -> dict[str, Any]:
        try:
            result = await cast(Awaitable[Result], spec.handler(family, p, caller, emit))
        except Exception as exc:
            raise self._failed(spec.name, caller, exc) from None
        return self._done(spec, caller, result)

    def _done(self, spec: Syscall, caller: Caller, result: Result) -> dict[str, Any]:
        # D-Bus types every reply from the declared model: any other result would pass on
        # the socket and fail only there.
        if type(result) is not spec.result:
            log.error(
                "syscall %s returned %s, not its declared %s",
                spec.name,
                type(result).__name__,
                spec.result.__name__,
            )
            self.access.audit(caller, spec.name, "failed", "internal error")
            raise InternalError(f"{spec.name} failed inside the daemon; the daemon log has details")
        self.access.audit(caller, spec.name, "ok")
        return result.model_dump(mode="json")

    def _failed(self, name: str, caller: Caller, exc: Exception) -> AiosError:
        """The error a failed handler gives its caller; audited, and logged when unexpected."""
        if isinstance(exc, AiosError):
            self.access.audit(caller, name, "failed", type(exc).__name__)
            return exc
        # Details go to the log only: clients never see a traceback or a path.
        log.error("syscall %s failed unexpectedly", name, exc_info=exc)
        self.access.audit(caller, name, "failed", "internal error")
        return InternalError(f"{name} failed inside the daemon; the daemon log has details")

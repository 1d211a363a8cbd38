"""The one path every request takes: validate → authorize → route → audit."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from pydantic import ValidationError

from aiosd.errors import AiosError, InternalError, InvalidParams, MethodNotFound
from aiosd.kernel.syscall_base import Emit, Handler, Params, Result
from aiosd.kernel.syscalls import SYSCALLS
from aiosd.managers.access import Caller, Role

if TYPE_CHECKING:
    from aiosd.kernel.kernel import Kernel

log = logging.getLogger(__name__)


def invalid_params(exc: ValidationError) -> InvalidParams:
    """Turn a pydantic error into InvalidParams naming every field path."""
    errors = [
        {"field": ".".join(str(p) for p in e["loc"]) or "(params)", "message": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return InvalidParams(
        f"invalid params: {first['field']}: {first['message']}{more}", data={"errors": errors}
    )


#: What :func:`dispatch` returns: the JSON-ready result when the syscall finished without
#: waiting, else a coroutine that runs the handler and finishes the path (audit, encoding).
Outcome = dict[str, Any] | Coroutine[Any, Any, dict[str, Any]]


def dispatch(
    kernel: Kernel, name: str, params: Any, caller: Caller, emit: Emit | None = None
) -> Outcome:
    """Run syscall ``name`` for ``caller``: its result, or a coroutine for it; raise AiosError.

    A syscall whose handler answers at once (``system.status``) completes here, with no task
    and no await; one that waits (``llm.chat``) returns the rest of this path to be awaited.
    """
    role = kernel.access.role(caller)
    if role is Role.none:
        # Callers with no role learn nothing, not even which syscalls or params exist.
        refusal = kernel.access.refusal(caller)
        kernel.access.audit(caller, name[:64], "denied", refusal.message)
        raise refusal
    spec = SYSCALLS.get(name)
    if spec is None:
        kernel.access.audit(caller, name[:64], "unknown")
        raise MethodNotFound(f"no syscall named {name[:64]!r}")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise InvalidParams("invalid params: params must be an object (named parameters)")
    try:
        p = spec.params.model_validate(params)
    except ValidationError as exc:
        err = invalid_params(exc)
        kernel.access.audit(caller, name, "invalid", err.message)
        raise err from None
    try:
        kernel.access.authorize(name, spec.permission, role)
    except AiosError as exc:
        kernel.access.audit(caller, name, "denied", exc.message)
        raise
    if spec.waits:
        # The handler's coroutine is made inside _finish, so a request cancelled before it
        # starts leaves no coroutine behind that was never awaited.
        return _finish(kernel, name, caller, spec.handler, p, emit)
    try:
        result = spec.handler(kernel, p, caller, emit)
    except Exception as exc:
        raise _failed(kernel, name, caller, exc) from None
    return _done(kernel, name, caller, cast(Result, result))


async def _finish(
    kernel: Kernel, name: str, caller: Caller, handler: Handler, p: Params, emit: Emit | None
) -> dict[str, Any]:
    try:
        result = await cast(Awaitable[Result], handler(kernel, p, caller, emit))
    except Exception as exc:
        raise _failed(kernel, name, caller, exc) from None
    return _done(kernel, name, caller, result)


def _done(kernel: Kernel, name: str, caller: Caller, result: Result) -> dict[str, Any]:
    kernel.access.audit(caller, name, "ok")
    return result.model_dump(mode="json")


def _failed(kernel: Kernel, name: str, caller: Caller, exc: Exception) -> AiosError:
    """The error a failed handler gives its caller; audited, and logged when unexpected."""
    if isinstance(exc, AiosError):
        kernel.access.audit(caller, name, "failed", type(exc).__name__)
        return exc
    # Details go to the log only: clients never see a traceback or a path.
    log.error("syscall %s failed unexpectedly", name, exc_info=exc)
    kernel.access.audit(caller, name, "failed", "internal error")
    return InternalError(f"{name} failed inside the daemon; the daemon log has details")

"""The one path every request takes: validate → authorize → route → audit."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from aiosd.errors import AiosError, InternalError, InvalidParams, MethodNotFound
from aiosd.kernel.syscall_base import Emit
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


async def dispatch(
    kernel: Kernel, name: str, params: Any, caller: Caller, emit: Emit | None = None
) -> dict[str, Any]:
    """Run syscall ``name`` for ``caller``; return its JSON-ready result or raise AiosError."""
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
        kernel.access.authorize(caller, name, spec.permission, role)
    except AiosError as exc:
        kernel.access.audit(caller, name, "denied", exc.message)
        raise
    try:
        result = await spec.handler(kernel, p, caller, emit)
    except AiosError as exc:
        kernel.access.audit(caller, name, "failed", type(exc).__name__)
        raise
    except Exception:
        # Details go to the log only: clients never see a traceback or a path.
        log.exception("syscall %s failed unexpectedly", name)
        kernel.access.audit(caller, name, "failed", "internal error")
        raise InternalError(
            f"{name} failed inside the daemon; the daemon log has details"
        ) from None
    kernel.access.audit(caller, name, "ok")
    return result.model_dump(mode="json")

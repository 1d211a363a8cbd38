"""What every syscall declaration is made of.

A syscall is declared where it is handled: a family module (``kernel/families/``) defines a
class holding the narrow services its handlers need, and marks each handler method with
:func:`syscall`.  The table (``kernel/syscalls.py``) only collects the families with
:func:`declared`; the kernel builds one instance of each family and calls handlers on it.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from aiosd.managers.access import Caller, Permission

MAX_TEXT = 4 * 1024 * 1024
Name = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.:\-/]+$")]


class BusBinary:
    """Field marker: a value that is text, or base64 when the model's ``encoding`` says so.

    JSON has no bytes, so the socket carries binary values as base64 text; D-Bus has them,
    so there the field is a variant holding ``s`` (text) or ``ay`` (bytes), converted by
    the D-Bus transport (api/dbus/binary.py).
    """


class Params(BaseModel):
    """Base of every parameter model: unknown fields are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    """Syscalls without parameters."""


class Result(BaseModel):
    """Base of every result model."""

    model_config = ConfigDict(extra="forbid")


Emit = Callable[[dict[str, Any]], Awaitable[None]]
#: ``handler(family, params, caller, emit)``: a plain function when the syscall has nothing to
#: wait for (it then runs with no task of its own), an ``async def`` when it waits.  ``emit``
#: is None for syscalls not declared ``streams``; a streaming handler decides from its own
#: parameters (``llm.chat``'s ``stream``) whether to use it.
Handler = Callable[[Any, Any, Caller, "Emit | None"], "Result | Awaitable[Result]"]


@dataclass(frozen=True)
class Syscall:
    """One syscall's declaration."""

    name: str
    params: type[Params]
    result: type[Result]
    permission: Permission | None
    handler: Handler
    summary: str
    #: The family class the handler is a method of; the kernel calls it on that family's
    #: instance.
    family: type
    streams: bool = False
    #: Whether the handler is an ``async def`` (it waits); found from the handler itself.
    waits: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "waits", inspect.iscoroutinefunction(self.handler))


@dataclass(frozen=True)
class _Mark:
    name: str
    params: type[Params]
    result: type[Result]
    permission: Permission | None
    summary: str
    streams: bool


F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__aiosd_syscall__"


def syscall(
    name: str,
    params: type[Params],
    result: type[Result],
    permission: Permission | None,
    summary: str,
    *,
    streams: bool = False,
) -> Callable[[F], F]:
    """Declare the decorated family method as the handler of syscall ``name``."""

    def mark(fn: F) -> F:
        setattr(fn, _MARK, _Mark(name, params, result, permission, summary, streams))
        return fn

    return mark


def declared(*families: type) -> dict[str, Syscall]:
    """Every syscall the ``families`` declare, by name, in declaration order."""
    out: dict[str, Syscall] = {}
    for family in families:
        for fn in vars(family).values():
            m = getattr(fn, _MARK, None)
            if not isinstance(m, _Mark):
                continue
            if m.name in out:
                raise TypeError(f"syscall {m.name!r} is declared twice")
            out[m.name] = Syscall(
                m.name, m.params, m.result, m.permission, fn, m.summary, family, m.streams
            )
    return out


def bind(
    table: Mapping[str, Syscall], families: Mapping[type, object]
) -> dict[str, tuple[Syscall, object]]:
    """Each syscall with the family instance its handler runs on; every family must be given."""
    missing = sorted({s.family.__name__ for s in table.values() if s.family not in families})
    if missing:
        raise TypeError(f"no instance of syscall family {', '.join(missing)}")
    return {name: (spec, families[spec.family]) for name, spec in table.items()}

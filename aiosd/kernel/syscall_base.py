"""What every syscall declaration is made of (the table itself is in syscalls.py)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from aiosd.managers.access import Caller, Permission

if TYPE_CHECKING:
    from aiosd.kernel.kernel import Kernel

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
#: A plain function when the syscall has nothing to wait for (it then runs with no task of its
#: own), an ``async def`` when it waits.
Handler = Callable[["Kernel", Any, Caller, "Emit | None"], "Result | Awaitable[Result]"]


@dataclass(frozen=True)
class Syscall:
    """One syscall's declaration."""

    name: str
    params: type[Params]
    result: type[Result]
    permission: Permission | None
    handler: Handler
    summary: str
    streams: bool = False
    #: Whether the handler is an ``async def`` (it waits); found from the handler itself.
    waits: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "waits", inspect.iscoroutinefunction(self.handler))

"""What every syscall declaration is made of.

A syscall is declared where it is handled: a family module (``kernel/families/``) defines a
class holding the narrow services its handlers need, and marks each handler method with
:func:`syscall`.  The table (``kernel/syscalls.py``) only collects the families with
:func:`declared`; the kernel builds one instance of each family and calls handlers on it.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from aiosd.managers.access import Caller, Permission

MAX_TEXT = 4 * 1024 * 1024
Name = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.:\-/]+$")]


class BusBinary:
    """Field marker: a value that is text, or base64 when the model's ``encoding`` says so.

    JSON has no bytes, so the socket carries binary values as base64 text; D-Bus has them,
    so there the field is a variant holding ``s`` (text) or ``ay`` (bytes), converted by
    the D-Bus transport (api/dbus/binary.py).
    """


#: Containers (objects, arrays) nested in one request's params, the params object included.
#: Free-form data deeper than this could not travel back over D-Bus, whose messages nest at
#: most 32 arrays and 32 structures (each level of a JSON object there is an ``a{sv}``).
MAX_NESTING = 16
#: Longest name of a member of a free-form object, in characters.
MAX_KEY_CHARS = 256
#: Largest free-form object (storage metadata), in bytes of its compact JSON.
MAX_METADATA_BYTES = 64 * 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: What no string may hold: NUL (D-Bus strings cannot carry it) and lone surrogates (not
#: UTF-8, so neither SQLite nor D-Bus can keep them).
_UNCARRIABLE = re.compile("[\x00\ud800-\udfff]")


def uncarriable(value: Any, path: str = "", depth: int = 1) -> tuple[str, str] | None:
    """The first part of ``value`` that a transport could not carry back, as (field, why).

    The rules every syscall's params follow, on both transports: text without NUL or lone
    surrogates, integers within 64 bits, finite numbers, at most :data:`MAX_NESTING` levels
    of containers, object member names at most :data:`MAX_KEY_CHARS` long.
    """
    if isinstance(value, str):
        bad = _UNCARRIABLE.search(value)
        if bad is None:
            return None
        what = "NUL" if bad.group() == "\x00" else "a lone surrogate (not UTF-8)"
        return path or "(params)", f"text contains {what} at offset {bad.start()}"
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return None
        return path or "(params)", "integer out of the signed 64-bit range"
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "(params)", "number is not finite")
    if isinstance(value, (dict, list)):
        if depth > MAX_NESTING:
            return path or "(params)", f"nested deeper than {MAX_NESTING} levels"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str):
                if len(key) > MAX_KEY_CHARS:
                    return path or "(params)", f"member name longer than {MAX_KEY_CHARS}"
                bad_key = uncarriable(key, f"{path}.(name)" if path else "(name)", depth)
                if bad_key is not None:
                    return bad_key
            sub = f"{path}.{key}" if path else str(key)
            found = uncarriable(item, sub, depth + 1)
            if found is not None:
                return found
    return None


def _metadata_size(value: dict[str, Any]) -> dict[str, Any]:
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"{size} bytes of JSON; at most {MAX_METADATA_BYTES}")
    return value


#: Free-form JSON object kept by the daemon (storage metadata, search filters).
Metadata = Annotated[dict[str, Any], AfterValidator(_metadata_size)]


class Params(BaseModel):
    """Base of every parameter model: unknown fields are errors, not ignored, and nothing a
    transport could not carry back gets in (:func:`uncarriable`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _carriable(cls, data: Any) -> Any:
        found = uncarriable(data)
        if found is not None:
            where, why = found
            raise PydanticCustomError("uncarriable", "{why}", {"field": where, "why": why})
        return data


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

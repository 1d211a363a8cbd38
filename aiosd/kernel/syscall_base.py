"""What every syscall declaration is made of.

A syscall is declared where it is handled: a family module (``kernel/families/``) defines a
class holding the narrow services its handlers need, and marks each handler method with
:func:`syscall`.  The table (``kernel/syscalls.py``) only collects the families with
:func:`declared`; the kernel builds one instance of each family and calls handlers on it.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import types
import typing
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from aiosd.managers.access import Caller, Permission

MAX_TEXT = 4 * 1024 * 1024
Name = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9_.:\-/]+$")]


class BusBinary:
    """Field marker: a value that is text, or base64 when the model's ``encoding`` says so.

    JSON has no bytes, so the socket carries binary values as base64 text; D-Bus has them,
    so there the field is a variant holding ``s`` (text) or ``ay`` (bytes), converted by
    the D-Bus transport (api/dbus/binary.py).
    """


#: Objects and arrays nested in one request's params, the params object itself counted, so
#: storage metadata (a member of params) nests at most 20 levels.  Measured with dbus-daemon:
#: a ``Storage.Get`` reply carries metadata of 20 levels of objects back, and 21 make the bus
#: drop the daemon's connection for everyone (each level of an object costs an array, a dict
#: entry and a variant of the 64 containers a D-Bus message may nest;
#: tests/api/test_input_rules.py measures it again).
MAX_NESTING = 21
#: Longest member name of an object anywhere in params, in characters.
MAX_KEY_CHARS = 256
#: Largest storage metadata (and search filter), in bytes of its compact JSON as UTF-8.
MAX_METADATA_BYTES = 64 * 1024
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: The most faults one refusal names; the walk stops there.
MAX_FAULTS = 8

_SURROGATE = re.compile("[\ud800-\udfff]")
_UNSHOWABLE = re.compile("[\x00\ud800-\udfff]")

#: Where a value is in params: member names and list indexes, outermost first.
Loc = tuple[str | int, ...]


def _text_fault(text: str, what: str = "text") -> str | None:
    """Why ``text`` cannot travel (it holds NUL or a lone surrogate), or None."""
    if "\x00" in text:  # memchr: cheap even for megabytes
        return (
            f"{what} contains NUL (character {text.index(chr(0))}), which D-Bus cannot carry; "
            "send binary data as base64"
        )
    if not text.isascii():  # isascii() is free: only other text needs the search
        bad = _SURROGATE.search(text)
        if bad is not None:
            return (
                f"{what} contains a lone surrogate (U+{ord(bad.group()):04X} at character "
                f"{bad.start()}), which is not UTF-8"
            )
    return None


def _value_fault(value: object) -> str | None:
    """Why a scalar cannot travel, or None."""
    if isinstance(value, str):
        return _text_fault(value)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            return None
        return "integer beyond the signed 64-bit range (-2**63 to 2**63-1)"
    if isinstance(value, float):
        return None if math.isfinite(value) else "number is not finite (NaN or infinity)"
    return f"a {type(value).__name__} is not a JSON value"


def _shown(name: object) -> str:
    """A member name as a field path shows it: NUL and surrogates written out, cut if long."""
    text = _UNSHOWABLE.sub(lambda m: ascii(m.group())[1:-1], str(name))
    return text if len(text) <= MAX_KEY_CHARS else text[:32] + "…"


def _name_fault(name: object) -> str | None:
    """Why an object's member name cannot travel, or None."""
    if not isinstance(name, str):
        return f"member name is {type(name).__name__} {_shown(name)}, not text"
    if len(name) > MAX_KEY_CHARS:
        return f"member name of {len(name)} characters; at most {MAX_KEY_CHARS} characters"
    return _text_fault(name, "member name")


def uncarriable(data: object, limit: int = MAX_FAULTS) -> list[tuple[Loc, str]]:
    """Where ``data`` (params as a transport decoded them) breaks the input rules, and why.

    Every string, member names included, is UTF-8 text without NUL; integers fit in 64 bits;
    numbers are finite; objects and arrays nest at most :data:`MAX_NESTING` levels (``data``
    itself is one); member names are text of at most :data:`MAX_KEY_CHARS` characters; there
    is nothing but JSON values.  At most ``limit`` faults, in document order.  The walk keeps
    its own stack, so no nesting makes it recurse, and it does not descend below the bound.
    """
    found: list[tuple[Loc, str]] = []
    if not isinstance(data, (dict, list)):
        why = _value_fault(data)
        return [] if why is None else [((), why)]
    # Each open container: its members still to look at, where it is (a chain of
    # (parent, name) links, made into a path only for a fault), whether it is an object,
    # and its level.
    stack: list[tuple[Iterator[tuple[Any, Any]], _Link, bool, int]] = [
        (_members(data), None, isinstance(data, dict), 1)
    ]
    while stack:
        members, where, is_object, depth = stack[-1]
        for name, value in members:
            # The common cases first, inline: the walk meets every value of the request.
            if is_object and (
                type(name) is not str
                or len(name) > MAX_KEY_CHARS
                or "\x00" in name
                or not name.isascii()
            ):
                why = _name_fault(name)
                if why is not None:
                    found.append((_path(where, _shown(name)), why))
                    if len(found) >= limit:
                        return found
                    continue
            kind = type(value)
            if kind is str:
                if "\x00" not in value and value.isascii():
                    continue
            elif kind is int:
                if INT64_MIN <= value <= INT64_MAX:
                    continue
            elif kind is float:
                if value - value == 0.0:  # NaN and the infinities give NaN
                    continue
            elif value is None or kind is bool:
                continue
            elif kind is dict or kind is list:
                if depth == MAX_NESTING:
                    why = f"nested deeper than {MAX_NESTING} levels of objects and arrays"
                    found.append((_path(where, name), why))
                    if len(found) >= limit:
                        return found
                elif value:
                    stack.append((_members(value), (where, name), kind is dict, depth + 1))
                    break  # look inside it first: faults come in document order
                continue
            why = _value_fault(value)
            if why is not None:
                found.append((_path(where, name), why))
                if len(found) >= limit:
                    return found
        else:
            stack.pop()
    return found


#: Where a container is: None for the params object, else (where its parent is, its name).
_Link = tuple[Any, str | int] | None


def _members(value: dict[Any, Any] | list[Any]) -> Iterator[tuple[Any, Any]]:
    return iter(value.items()) if isinstance(value, dict) else enumerate(value)


def _path(where: _Link, name: str | int) -> Loc:
    steps: list[str | int] = [name]
    while where is not None:
        where, step = where
        steps.append(step)
    return tuple(reversed(steps))


def _free_form(annotation: object) -> bool:
    """Whether a declared type holds free-form JSON (``Any``, ``dict[str, Any]``), which
    validation passes on as it came."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _free_form(args[0])
    if origin in (typing.Union, types.UnionType):
        real = [a for a in args if a is not types.NoneType]
        return len(real) == 1 and _free_form(real[0])
    if origin in (dict, list):
        return bool(args) and _free_form(args[-1])
    return annotation is Any or annotation is object


@functools.cache
def _converted_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The fields of ``model`` whose values validation may have made (text to a number)."""
    return tuple(n for n, f in model.model_fields.items() if not _free_form(f.annotation))


def _converted_faults(model: BaseModel) -> list[tuple[Loc, str]]:
    """Numbers that validation made from what was sent (``"9223372036854775808"`` for an
    integer, ``"inf"`` for a number) and that break the rules.

    Everything sent was walked before validation; free-form fields hold what was sent, so
    only the declared ones are walked again, for their numbers.
    """
    found: list[tuple[Loc, str]] = []
    stack: list[tuple[object, Loc]] = [(model, ())]
    while stack and len(found) < MAX_FAULTS:
        value, loc = stack.pop()
        if isinstance(value, BaseModel):
            names = _converted_fields(type(value))
            stack.extend((getattr(value, n), (*loc, n)) for n in reversed(names))
        elif isinstance(value, dict):
            stack.extend((v, (*loc, k)) for k, v in reversed(value.items()))
        elif isinstance(value, (list, tuple)):
            stack.extend((v, (*loc, i)) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            why = _value_fault(value)
            if why is not None:
                found.append((loc, why))
    return found


def _refusal(model: str, faults: list[tuple[Loc, str]]) -> ValidationError:
    """The validation error naming each fault's place (dispatch makes it InvalidParams)."""
    return ValidationError.from_exception_data(
        model,
        [
            InitErrorDetails(
                type=PydanticCustomError("uncarriable", "{why}", {"why": why}),
                loc=loc,
                input=None,
            )
            for loc, why in faults
        ],
    )


def json_at_most(limit: int) -> AfterValidator:
    """A field's check that its free-form value is at most ``limit`` bytes of compact JSON."""

    def check(value: dict[str, Any]) -> dict[str, Any]:
        # The params rules ran first: no NaN, nothing deeper than MAX_NESTING, only text
        # that is UTF-8.
        size = len(
            json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode(
                "utf-8", "surrogatepass"
            )
        )
        if size > limit:
            raise ValueError(f"{size} bytes as compact JSON; at most {limit} bytes")
        return value

    return AfterValidator(check)


#: Storage metadata: a free-form JSON object of at most :data:`MAX_METADATA_BYTES`.
Metadata = Annotated[dict[str, Any], json_at_most(MAX_METADATA_BYTES)]
#: A search filter on metadata's top-level members: scalars only, as large as metadata.
MetadataFilter = Annotated[dict[str, str | int | float | bool], json_at_most(MAX_METADATA_BYTES)]


class Params(BaseModel):
    """Base of every parameter model: unknown fields are errors, not ignored, and nothing a
    transport could not carry back gets in.

    The input rules (:func:`uncarriable`) hold for every syscall's params on both
    transports, checked here once: before validation on what was sent (so that no field's
    own check meets NUL, NaN or runaway nesting first), and after it on the numbers that
    validation converted.  Fields with tighter bounds of their own keep them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="wrap")
    @classmethod
    def _carried(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        if isinstance(data, dict):
            faults = uncarriable(data)
            if faults:
                raise _refusal(cls.__name__, faults)
        model = handler(data)
        faults = _converted_faults(model)
        if faults:
            raise _refusal(cls.__name__, faults)
        return model


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

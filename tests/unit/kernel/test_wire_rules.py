"""The rules every syscall's params follow on both transports (aiosd.kernel.syscall_base).

Whatever the daemon accepts must be able to travel back over the socket and over D-Bus and
into SQLite unchanged; what cannot is refused at the door with InvalidParams naming where it
is.  The rules live in the ``Params`` base, so every syscall gets them without declaring them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from aiosd.kernel.dispatch import invalid_params
from aiosd.kernel.families.storage import GetParams, PutParams, RollbackParams, SearchParams
from aiosd.kernel.syscall_base import (
    INT64_MAX,
    INT64_MIN,
    MAX_KEY_CHARS,
    MAX_METADATA_BYTES,
    MAX_NESTING,
    Metadata,
    Params,
)
from aiosd.kernel.syscalls import SYSCALLS
from tests.support import REPO

#: Valid params of every syscall, with every field given (nested ones too), so that each
#: string, integer and number a caller can send has a place here to be made hostile.
VALID: dict[str, dict[str, Any]] = {
    "llm.chat": {
        "messages": [
            {"role": "system", "content": "be brief"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "weather", "arguments": {"city": "Oslo", "days": 2}}],
            },
            {"role": "tool", "content": "sunny", "tool_name": "weather"},
        ],
        "model": "smollm2",
        "max_tokens": 16,
        "temperature": 0.5,
        "seed": 7,
        "priority": "batch",
        "stream": False,
        "response_schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "description": "the weather",
                    "parameters": {"type": "object", "required": ["city"]},
                },
            }
        ],
        "session": "talk",
    },
    "llm.models": {},
    "system.status": {},
    "system.queue": {},
    "storage.put": {
        "collection": "notes",
        "key": "todo",
        "value": "milk",
        "encoding": "text",
        "metadata": {"project": "home", "n": [1, 2.5, True, None, {"deep": "x"}]},
    },
    "storage.get": {"collection": "notes", "key": "todo", "version": 2, "owner": "alice"},
    "storage.list": {
        "collection": "notes",
        "prefix": "t",
        "limit": 10,
        "after": "a",
        "owner": 1000,
    },
    "storage.delete": {"collection": "notes", "key": "todo", "purge": True},
    "storage.search": {
        "query": "milk",
        "collection": "notes",
        "metadata": {"project": "home", "n": 2, "f": 0.5, "b": True},
        "limit": 5,
        "offset": 1,
        "owner": "alice",
    },
    "storage.history": {"collection": "notes", "key": "todo", "owner": "alice"},
    "storage.rollback": {"collection": "notes", "key": "todo", "at": 1.5},
    "storage.share": {"collection": "notes", "group": "staff", "mode": "read"},
    "storage.unshare": {"collection": "notes", "group": "staff"},
    "storage.usage": {},
    "storage.set_quota": {"user": "alice", "quota_bytes": 10, "quota_entries": 10},
    "memory.add": {"content": "x", "tags": ["t"], "pinned": True, "space": "s"},
    "memory.get": {"id": 1, "space": "s"},
    "memory.search": {"query": "q", "space": "s", "limit": 3},
    "memory.update": {"id": 1, "content": "x", "tags": ["t"], "pinned": False, "space": "s"},
    "memory.delete": {"id": 1, "space": "s"},
    "memory.clear": {"space": "s", "keep_pinned": False},
    "agent.spawn": {
        "argv": ["/bin/sh", "-c", "true"],
        "cwd": "/tmp",
        "env": {"COLOUR": "green"},
        "limits": {"memory_max": 1 << 20, "tasks_max": 8, "runtime_max": 5.0, "cpu_weight": 50},
        "priority": "batch",
        "memory_budget": 4096,
        "tools": ["files.read"],
        "label": "l",
        "user": "alice",
    },
    "agent.list": {"ended": False},
    "agent.info": {"aid": "0123456789ab"},
    "agent.stop": {"aid": "0123456789ab", "timeout": 1.5},
    "agent.kill": {"aid": "0123456789ab", "signal": "TERM"},
    "agent.suspend": {"aid": "0123456789ab"},
    "agent.resume": {"aid": "0123456789ab"},
    "agent.wait": {"aid": "0123456789ab", "timeout": 2.0},
    "agent.logs": {"aid": "0123456789ab", "tail": 3, "stream": True},
    "agent.available": {},
    "tool.list": {},
    "tool.describe": {"name": "fs.read"},
    "tool.call": {"name": "fs.read", "arguments": {"path": "~/notes", "max_bytes": 100}},
    "tool.pending": {},
    "tool.confirm": {"request": "0123456789abcdef", "allow": True, "remember": "session"},
    "tool.grants": {},
    "tool.revoke": {"name": "fs.write"},
}

Path = tuple[str | int, ...]


def leaves(value: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every scalar of a JSON value with its path."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, (*path, i))
    else:
        yield path, value


def member_names(value: Any, path: Path = ()) -> Iterator[Path]:
    """The path of every member of every object (its last step is the member's name)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*path, k)
            yield from member_names(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from member_names(v, (*path, i))


def replaced(value: Any, path: Path, new: Any) -> Any:
    """A copy of ``value`` with the leaf at ``path`` replaced by ``new``."""
    if not path:
        return new
    out = json.loads(json.dumps(value))
    here = out
    for step in path[:-1]:
        here = here[step]
    here[path[-1]] = new
    return out


def renamed(value: Any, path: Path, name: Any) -> Any:
    """A copy of ``value`` whose member at ``path`` is called ``name`` instead."""
    out = json.loads(json.dumps(value))
    here = out
    for step in path[:-1]:
        here = here[step]
    here[name] = here.pop(path[-1])
    return out


def dotted(path: Path) -> str:
    return ".".join(str(p) for p in path)


def errors(model: type[BaseModel], data: Any) -> list[dict[str, str]]:
    """The ``data.errors`` a client gets for ``data``."""
    with pytest.raises(ValidationError) as err:
        model.model_validate(data)
    found: list[dict[str, str]] = invalid_params(err.value).data["errors"]
    return found


def first(model: type[BaseModel], data: Any) -> tuple[str, str]:
    e = errors(model, data)[0]
    return e["field"], e["message"]


def carriable(value: Any, depth: int = 1) -> bool:
    """The test's own statement of the rules, applied to what validation produced."""
    if isinstance(value, BaseModel):
        return all(carriable(getattr(value, f), depth + 1) for f in type(value).model_fields)
    if isinstance(value, dict):
        return depth <= MAX_NESTING and all(
            isinstance(k, str) and carriable(k) and carriable(v, depth + 1)
            for k, v in value.items()
        )
    if isinstance(value, list):
        return depth <= MAX_NESTING and all(carriable(v, depth + 1) for v in value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return "\x00" not in value
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, int):
        return INT64_MIN <= value <= INT64_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    return False


def nested(levels: int, leaf: Any = 1, kind: str = "object") -> Any:
    """``levels`` objects (or arrays) one inside the other, the outermost counted."""
    value = leaf
    for _ in range(levels):
        value = {"a": value} if kind == "object" else [value]
    return value


# --- the table of valid params is complete ------------------------------------------------------


def test_every_syscall_has_valid_params_here_and_they_pass() -> None:
    assert set(VALID) == set(SYSCALLS)
    for name, params in VALID.items():
        model = SYSCALLS[name].params.model_validate(params)
        assert carriable(model), name


# --- text ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SYSCALLS))
@pytest.mark.parametrize(
    ("bad", "why"), [("a\x00b", "NUL"), ("a\udc80b", "lone surrogate"), ("\ud800", "surrogate")]
)
def test_text_anywhere_with_nul_or_a_lone_surrogate_is_refused_naming_it(
    name: str, bad: str, why: str
) -> None:
    model, params = SYSCALLS[name].params, VALID[name]
    strings = [p for p, v in leaves(params) if isinstance(v, str)]
    for path in strings:
        field, message = first(model, replaced(params, path, bad))
        assert (field, why in message) == (dotted(path), True), (name, path, message)


@pytest.mark.parametrize("name", sorted(SYSCALLS))
def test_member_names_anywhere_follow_the_text_rules(name: str) -> None:
    model, params = SYSCALLS[name].params, VALID[name]
    for path in member_names(params):
        if len(path) == 1:
            continue  # a params member: an unknown name is refused anyway
        field, message = first(model, renamed(params, path, "k\x00"))
        assert field == dotted((*path[:-1], "k\\x00")) and "member name" in message, path
        assert "\x00" not in field + message  # a D-Bus error message would end there
        field, message = first(model, renamed(params, path, "\udc80"))
        assert field == dotted((*path[:-1], "\\udc80")) and "lone surrogate" in message, path


@pytest.mark.parametrize("name", sorted(SYSCALLS))
def test_fields_not_given_above_are_covered_too(name: str) -> None:
    # Each declared field with a bad string: the rule speaks first, naming that field only.
    model = SYSCALLS[name].params
    for field in model.model_fields:
        for bad in ("x\x00y", "x\udc80y"):
            assert [e["field"] for e in errors(model, {field: bad})] == [field], (name, field)


# --- numbers ------------------------------------------------------------------------------------

HOSTILE_NUMBERS: list[Any] = [
    2**63,
    -(2**63) - 1,
    2**64 - 1,
    10**30,
    "9223372036854775808",
    "-9223372036854775809",
    float("nan"),
    float("inf"),
    float("-inf"),
    "nan",
    "inf",
    "-inf",
    "Infinity",
]


@pytest.mark.parametrize("name", sorted(SYSCALLS))
def test_no_integer_beyond_64_bits_and_no_nan_or_infinity_gets_in_anywhere(name: str) -> None:
    # Every place a scalar can go, with every hostile number (also as text a field would
    # convert): refused naming that place, or accepted only as something carriable (the
    # text "inf" as a metadata value, say).
    model, params = SYSCALLS[name].params, VALID[name]
    for path, _ in leaves(params):
        for bad in HOSTILE_NUMBERS:
            data = replaced(params, path, bad)
            try:
                validated = model.model_validate(data)
            except ValidationError as exc:
                fields = [e["field"] for e in invalid_params(exc).data["errors"]]
                assert any(f.startswith(dotted(path)) for f in fields), (name, path, bad, fields)
                continue
            assert carriable(validated), (name, path, bad)


@pytest.mark.parametrize(
    ("model", "data", "field"),
    [
        (GetParams, {"collection": "c", "key": "k", "version": 2**63}, "version"),
        (GetParams, {"collection": "c", "key": "k", "version": "9223372036854775808"}, "version"),
        (RollbackParams, {"collection": "c", "key": "k", "version": "1" + "0" * 30}, "version"),
        (RollbackParams, {"collection": "c", "key": "k", "at": "Infinity"}, "at"),
        (RollbackParams, {"collection": "c", "key": "k", "at": float("inf")}, "at"),
        (SearchParams, {"query": "q", "metadata": {"n": float("nan")}}, "metadata.n"),
        (
            PutParams,
            {"collection": "c", "key": "k", "value": "v", "metadata": {"n": 2**63}},
            "metadata.n",
        ),
    ],
)
def test_numbers_sqlite_or_dbus_cannot_hold_are_refused(
    model: type[BaseModel], data: dict[str, Any], field: str
) -> None:
    got, message = first(model, data)
    assert got == field
    assert "64-bit" in message or "not finite" in message


# --- free-form data: nesting, member names, size, JSON only --------------------------------------

PUT = {"collection": "c", "key": "k", "value": "v"}


@pytest.mark.parametrize("kind", ["object", "array"])
def test_nesting_is_bounded_where_dbus_can_still_carry_the_reply(kind: str) -> None:
    # Measured with dbus-daemon (tests/api/test_input_rules.py): metadata of 20 levels of
    # objects comes back from Storage.Get, 21 make the bus drop the daemon's connection.
    assert MAX_NESTING - 1 == 20
    deepest = {"m": nested(MAX_NESTING - 2, kind=kind)}  # metadata, m, then the rest
    assert PutParams.model_validate({**PUT, "metadata": deepest}).metadata == deepest
    field, message = first(
        PutParams, {**PUT, "metadata": {"m": nested(MAX_NESTING - 1, kind=kind)}}
    )
    steps = "a" if kind == "object" else "0"
    assert field == ".".join(["metadata", "m", *[steps] * (MAX_NESTING - 2)])
    assert "nested deeper than" in message
    # Far deeper (once stored fine, then every read failed): refused the same way.
    assert "nested deeper than" in first(PutParams, {**PUT, "metadata": nested(300, kind=kind)})[1]


def test_nesting_counts_from_the_params_object_for_every_syscall() -> None:
    # Arguments of a tool call sit five levels down: params, messages, a message, its
    # tool_calls, one call.  The same bound, no per-syscall number.
    chat = VALID["llm.chat"]
    path = ("messages", 1, "tool_calls", 0, "arguments")
    SYSCALLS["llm.chat"].params.model_validate(replaced(chat, path, nested(MAX_NESTING - 5)))
    field, message = first(
        SYSCALLS["llm.chat"].params, replaced(chat, path, nested(MAX_NESTING - 4))
    )
    assert field.startswith(dotted(path)) and "nested deeper than" in message


def test_member_names_are_bounded_in_length() -> None:
    fits = {"k" * MAX_KEY_CHARS: 1}
    assert PutParams.model_validate({**PUT, "metadata": fits}).metadata == fits
    field, message = first(PutParams, {**PUT, "metadata": {"x": {"k" * (MAX_KEY_CHARS + 1): 1}}})
    assert field.startswith("metadata.x.kkkk") and len(field) < 100
    assert f"at most {MAX_KEY_CHARS}" in message


def test_member_names_must_be_text() -> None:
    # D-Bus can send a dictionary keyed by integers (a{xv}); JSON would rename 1 to "1".
    field, message = first(PutParams, {**PUT, "metadata": {"m": {1: "x"}}})
    assert field == "metadata.m.1" and "member name" in message and "not text" in message


def test_free_form_values_are_json_only() -> None:
    for bad in (b"bytes", {1, 2}, object()):
        field, message = first(PutParams, {**PUT, "metadata": {"x": [bad]}})
        assert field == "metadata.x.0" and "not a JSON value" in message, bad


def _compact(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def test_metadata_and_search_filters_are_bounded_in_bytes() -> None:
    # Counted as compact JSON in UTF-8: "é" is two bytes.
    base = _compact({"x": ""})
    fits = {"x": "é" * ((MAX_METADATA_BYTES - base) // 2)}
    assert _compact(fits) == MAX_METADATA_BYTES
    assert PutParams.model_validate({**PUT, "metadata": fits}).metadata == fits
    over = {"x": fits["x"] + "y"}
    field, message = first(PutParams, {**PUT, "metadata": over})
    assert field == "metadata" and f"at most {MAX_METADATA_BYTES}" in message
    field, message = first(SearchParams, {"query": "q", "metadata": over})
    assert field == "metadata" and f"at most {MAX_METADATA_BYTES}" in message


def test_several_faults_are_named_together() -> None:
    data = {**PUT, "metadata": {"a": float("nan"), "b": ["ok", "x\x00"], "c": 2**64}}
    assert [e["field"] for e in errors(PutParams, data)] == [
        "metadata.a",
        "metadata.b.1",
        "metadata.c",
    ]


# --- one rule for every model, declared nowhere else ---------------------------------------------


class _Newcomer(Params):
    """A syscall's params that declare nothing about the rules."""

    count: int = 0
    ratio: float = 0.0
    note: str = ""
    extra: Metadata | None = None
    free: dict[str, Any] | None = None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"count": "99999999999999999999"}, "count"),
        ({"ratio": "nan"}, "ratio"),
        ({"note": "a\x00"}, "note"),
        ({"free": {"x": [float("-inf")]}}, "free.x.0"),
        ({"free": nested(MAX_NESTING)}, "free" + ".a" * (MAX_NESTING - 1)),
        ({"extra": {"big": "x" * MAX_METADATA_BYTES}}, "extra"),
    ],
)
def test_a_new_syscalls_params_get_the_rules_by_being_params(
    data: dict[str, Any], field: str
) -> None:
    assert first(_Newcomer, data)[0] == field


def test_ordinary_values_pass_unchanged() -> None:
    meta = {"a": ["é", 1, 2.5, True, None, {"b": INT64_MIN, "c": INT64_MAX}], "": "empty name"}
    assert PutParams.model_validate({**PUT, "metadata": meta}).metadata == meta


# --- documented ---------------------------------------------------------------------------------


def test_the_rules_and_their_numbers_are_documented() -> None:
    text = (REPO / "docs" / "protocol.md").read_text()
    section = re.search(r"\n## Input rules\n(.*?)\n## ", text, re.S)
    assert section is not None, "docs/protocol.md has no '## Input rules' section"
    body = section.group(1)
    for fact in (
        "NUL",
        "lone surrogate",
        "NaN",
        "Infinity",
        f"{MAX_NESTING} levels",
        f"{MAX_NESTING - 1} levels",
        f"{MAX_KEY_CHARS} characters",
        f"{MAX_METADATA_BYTES} bytes",
        "InvalidParams",
    ):
        assert fact in body, fact
    assert "[Input rules](#input-rules)" in text  # listed in the contents
    # The example is what the rules answer (as the daemon writes it: compact, UTF-8).
    request, reply = re.findall(r"^[→←] (.*)$", body, re.M)
    msg = json.loads(request)
    with pytest.raises(ValidationError) as err:
        SYSCALLS[msg["method"]].params.model_validate(msg["params"])
    answer = {"jsonrpc": "2.0", "id": msg["id"], "error": invalid_params(err.value).to_rpc()}
    assert reply == json.dumps(answer, ensure_ascii=False, separators=(",", ":"))

"""Every result member of every syscall has one D-Bus signature, derived from its model.

The snapshot pins what desktop clients see: a change of a result model that changes a
member's type on the bus fails here until the snapshot (a documented interface) is updated.
The table is iterated, so a new syscall fails here until it is pinned too.
"""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from gi.repository import GLib
from pydantic import BaseModel

from aiosd.api.dbus import codec
from aiosd.api.dbus.introspection import bus_methods, manager_xml
from aiosd.api.dbus.variants import free_from_bus, free_variant
from aiosd.kernel.syscall_base import BusBinary, NoParams, Result, Syscall
from aiosd.kernel.syscalls import SYSCALLS
from aiosd.managers.access import Permission

#: An agent as every agent.* syscall that acts on one returns it (``AgentInfo``).
#: Members that may be null (``name``, ``pid``, ``ended``, ``exit_code``, ``signal``,
#: ``tools``) are left out of the ``a{sv}`` when they are: they keep their declared type.
AGENT_INFO: dict[str, str] = {
    "aid": "s",
    "user": "s",
    "uid": "x",
    "label": "s",
    "name": "s",
    "argv": "as",
    "cwd": "s",
    "state": "s",
    "pid": "x",
    "backend": "s",
    "started": "d",
    "ended": "d",
    "exit_code": "x",
    "signal": "s",
    "reason": "s",
    "priority": "s",
    "memory_space": "s",
    "memory_budget": "x",
    "tools": "as",
    "limits": "a{sv}",
    "limits.memory_max": "x",
    "limits.tasks_max": "x",
    "limits.runtime_max": "d",
    "limits.cpu_weight": "x",
    "cpu_s": "d",
    "rss": "x",
    "max_rss": "x",
    "tasks": "x",
    "tokens_in": "x",
    "tokens_out": "x",
    "syscalls": "x",
}

TOOL_INFO = {
    "name": "s",
    "description": "s",
    "parameters": "a{sv}",
    "annotations": "a{sb}",
    "source": "s",
    "runs_as": "s",
    "needs_confirmation": "b",
}

SNAPSHOT: dict[str, dict[str, str]] = {
    "llm.chat": {
        "request_id": "x",
        "model": "s",
        "message": "a{sv}",
        "message.role": "s",
        "message.content": "s",
        "message.tool_calls": "aa{sv}",
        "message.tool_calls[].name": "s",
        "message.tool_calls[].arguments": "a{sv}",
        "message.tool_name": "s",
        "finish_reason": "s",
        "usage": "a{sv}",
        "usage.prompt_tokens": "x",
        "usage.completion_tokens": "x",
        "timings": "a{sv}",
        "timings.queued_ms": "d",
        "timings.first_token_ms": "d",
        "timings.total_ms": "d",
        "session": "a{sv}",
        "session.name": "s",
        "session.replayed": "x",
        "session.moved": "x",
        "notes": "as",
        "steps": "aa{sv}",
        "steps[].reply": "x",
        "steps[].tool": "s",
        "steps[].arguments": "a{sv}",
        "steps[].ok": "b",
        "steps[].output": "a{sv}",
        "steps[].error": "a{sv}",
        "steps[].elapsed_ms": "d",
    },
    "llm.models": {
        "default": "s",
        "models": "aa{sv}",
        "models[].name": "s",
        "models[].backend": "s",
        "models[].slots": "x",
        "models[].context_length": "x",
        "models[].default": "b",
        "models[].detail": "a{sv}",
    },
    "system.status": {
        "version": "s",
        "pid": "x",
        "uptime_s": "d",
        "state": "s",
        "models": "as",
        "default_model": "s",
        "running": "x",
        "waiting": "x",
        "connections": "x",
        "caller_uid": "x",
        "caller_role": "s",
        "caller_aid": "s",
        "agents_backend": "s",
        "agents_running": "x",
    },
    "system.queue": {
        "models": "aa{sv}",
        "models[].model": "s",
        "models[].slots": "x",
        "models[].served": "x",
        "models[].running_total": "x",
        "models[].waiting_total": "x",
        "models[].by_priority": "aa{sv}",
        "models[].by_priority[].priority": "s",
        "models[].by_priority[].running": "x",
        "models[].by_priority[].waiting": "x",
        "models[].running": "aa{sv}",
        "models[].running[].request_id": "x",
        "models[].running[].uid": "x",
        "models[].running[].pid": "x",
        "models[].running[].priority": "s",
        "models[].running[].slot": "x",
        "models[].running[].waited_ms": "d",
        "models[].running[].running_ms": "d",
        "models[].waiting": "aa{sv}",
        "models[].waiting[].request_id": "x",
        "models[].waiting[].position": "x",
        "models[].waiting[].uid": "x",
        "models[].waiting[].pid": "x",
        "models[].waiting[].priority": "s",
        "models[].waiting[].waited_ms": "d",
    },
    "storage.put": {
        "collection": "s",
        "key": "s",
        "version": "x",
        "size": "x",
        "created": "d",
        "from_version": "x",
    },
    "storage.get": {
        "collection": "s",
        "key": "s",
        "version": "x",
        "value": "v",
        "encoding": "s",
        "metadata": "a{sv}",
        "size": "x",
        "created": "d",
    },
    "storage.list": {
        "entries": "aa{sv}",
        "entries[].key": "s",
        "entries[].version": "x",
        "entries[].size": "x",
        "entries[].updated": "d",
        "next": "s",
    },
    "storage.delete": {
        "collection": "s",
        "key": "s",
        "version": "x",
        "deleted": "b",
    },
    "storage.search": {
        "hits": "aa{sv}",
        "hits[].collection": "s",
        "hits[].key": "s",
        "hits[].version": "x",
        "hits[].score": "d",
        "hits[].snippet": "s",
    },
    "storage.history": {
        "collection": "s",
        "key": "s",
        "versions": "aa{sv}",
        "versions[].version": "x",
        "versions[].size": "x",
        "versions[].created": "d",
        "versions[].deleted": "b",
    },
    "storage.rollback": {
        "collection": "s",
        "key": "s",
        "version": "x",
        "size": "x",
        "created": "d",
        "from_version": "x",
    },
    "storage.share": {
        "collection": "s",
        "shares": "aa{sv}",
        "shares[].group": "s",
        "shares[].gid": "x",
        "shares[].mode": "s",
    },
    "storage.unshare": {
        "collection": "s",
        "shares": "aa{sv}",
        "shares[].group": "s",
        "shares[].gid": "x",
        "shares[].mode": "s",
    },
    "storage.usage": {
        "uid": "x",
        "used_bytes": "x",
        "used_entries": "x",
        "quota_bytes": "x",
        "quota_entries": "x",
    },
    "storage.set_quota": {
        "uid": "x",
        "used_bytes": "x",
        "used_entries": "x",
        "quota_bytes": "x",
        "quota_entries": "x",
    },
    "memory.add": {
        "space": "s",
        "id": "x",
        "content": "s",
        "tags": "as",
        "pinned": "b",
        "created": "d",
        "updated": "d",
        "size": "x",
        "evicted": "ax",
    },
    "memory.get": {
        "space": "s",
        "id": "x",
        "content": "s",
        "tags": "as",
        "pinned": "b",
        "created": "d",
        "updated": "d",
        "size": "x",
        "evicted": "ax",
    },
    "memory.search": {
        "space": "s",
        "hits": "aa{sv}",
        "hits[].id": "x",
        "hits[].content": "s",
        "hits[].tags": "as",
        "hits[].pinned": "b",
        "hits[].created": "d",
        "hits[].updated": "d",
        "hits[].size": "x",
        "hits[].score": "d",
        "hits[].evicted": "b",
    },
    "memory.update": {
        "space": "s",
        "id": "x",
        "content": "s",
        "tags": "as",
        "pinned": "b",
        "created": "d",
        "updated": "d",
        "size": "x",
        "evicted": "ax",
    },
    "memory.delete": {
        "space": "s",
        "id": "x",
        "deleted": "b",
    },
    "memory.clear": {
        "space": "s",
        "removed": "x",
    },
    "agent.spawn": AGENT_INFO,
    "agent.info": AGENT_INFO,
    "agent.stop": AGENT_INFO,
    "agent.kill": AGENT_INFO,
    "agent.suspend": AGENT_INFO,
    "agent.resume": AGENT_INFO,
    "agent.wait": {**AGENT_INFO, "ended_in_time": "b"},
    "agent.list": {"agents": "aa{sv}", **{f"agents[].{k}": t for k, t in AGENT_INFO.items()}},
    "agent.logs": {
        "aid": "s",
        "lines": "aa{sv}",
        "lines[].time": "d",
        "lines[].stream": "s",
        "lines[].text": "s",
        "followed": "x",
        "dropped": "x",
    },
    "agent.available": {
        "agents": "aa{sv}",
        "agents[].name": "s",
        "agents[].description": "s",
        "agents[].exec": "as",
        "agents[].source": "s",
        "agents[].tools": "as",
        "agents[].priority": "s",
        "agents[].memory_budget": "x",
        "agents[].limits": "a{sv}",
        "agents[].limits.memory_max": "x",
        "agents[].limits.tasks_max": "x",
        "agents[].limits.runtime_max": "d",
        "agents[].limits.cpu_weight": "x",
        "problems": "as",
    },
    "tool.list": {
        "tools": "aa{sv}",
        **{f"tools[].{k}": t for k, t in TOOL_INFO.items()},
        "problems": "as",
    },
    "tool.describe": TOOL_INFO,
    "tool.call": {"tool": "s", "ok": "b", "output": "a{sv}", "error": "a{sv}", "elapsed_ms": "d"},
    "tool.pending": {
        "requests": "aa{sv}",
        "requests[].id": "s",
        "requests[].tool": "s",
        "requests[].arguments": "a{sv}",
        "requests[].annotations": "a{sb}",
        "requests[].aid": "s",
        "requests[].created": "d",
        "requests[].expires": "d",
    },
    "tool.confirm": {"request": "s", "tool": "s", "allowed": "b", "remember": "s"},
    "tool.grants": {"always": "as", "session": "as"},
    "tool.revoke": {"revoked": "as"},
}


def test_every_result_member_of_every_syscall_has_its_pinned_signature() -> None:
    derived = {name: codec.signatures(spec.result) for name, spec in SYSCALLS.items()}
    missing = sorted(set(derived) - set(SNAPSHOT))
    assert not missing, f"syscalls without pinned result signatures: {missing}"
    assert sorted(SNAPSHOT) == sorted(derived), "pinned syscalls that no longer exist"
    for name, pinned in SNAPSHOT.items():
        assert derived[name] == pinned, name


# --- the rules, on models of their own -------------------------------------------------------


class Inner(BaseModel):
    n: int


class Sample(Result):
    names: list[str]
    inners: list[Inner]
    maybe: list[int | None]
    counts: dict[str, int]
    free: dict[str, Any]
    optional: str | None = None
    either: int | str = 0
    blob: Annotated[str, BusBinary()] = ""
    encoding: str = "text"


def _wire(model: type[BaseModel], value: dict[str, Any]) -> GLib.Variant:
    """The result as it goes on the bus, read back from its serialized bytes."""
    sent = GLib.Variant("(a{sv})", (codec.result_vardict(model, value),))
    raw = GLib.Variant.new_from_bytes(sent.get_type(), sent.get_data_as_bytes(), False)
    return raw.get_child_value(0)


def _types(member_dict: GLib.Variant) -> dict[str, str]:
    out = {}
    for i in range(member_dict.n_children()):
        entry = member_dict.get_child_value(i)
        out[entry.get_child_value(0).get_string()] = (
            entry.get_child_value(1).get_variant().get_type_string()
        )
    return out


EMPTY: dict[str, Any] = {"names": [], "inners": [], "maybe": [], "counts": {}, "free": {}}
FULL: dict[str, Any] = {
    "names": ["a", "b"],
    "inners": [{"n": 1}],
    "maybe": [1, None, 2],
    "counts": {"x": 3},
    "free": {"list": [1, None, "two"], "gone": None, "nested": {"empty": []}},
    "optional": "here",
    "either": "text",
    "blob": "AP8=",
    "encoding": "base64",
}


def test_signatures_follow_the_declaration() -> None:
    assert codec.signatures(Sample) == {
        "names": "as",
        "inners": "aa{sv}",
        "inners[].n": "x",
        "maybe": "aax",
        "counts": "a{sx}",
        "free": "a{sv}",
        "optional": "s",
        "either": "v",
        "blob": "v",
        "encoding": "s",
    }


def test_empty_and_full_lists_have_the_same_type() -> None:
    empty = _types(_wire(Sample, Sample.model_validate(EMPTY).model_dump(mode="json")))
    full = _types(_wire(Sample, Sample.model_validate(FULL).model_dump(mode="json")))
    declared = codec.signatures(Sample)
    for name in ("names", "inners", "maybe", "counts", "free"):
        assert empty[name] == full[name] == declared[name], name
    assert full["blob"] == "ay" and empty["blob"] == "s"  # v: bytes or text, as documented
    assert full["either"] == "s" and empty["either"] == "x"  # v: a union, typed by the value


def test_nulls_are_left_out_or_kept_in_place_never_dropped() -> None:
    dumped = Sample.model_validate(FULL).model_dump(mode="json")
    wire = _wire(Sample, dumped)
    by_name = {
        wire.get_child_value(i).get_child_value(0).get_string(): wire.get_child_value(i)
        .get_child_value(1)
        .get_variant()
        for i in range(wire.n_children())
    }
    assert by_name["maybe"].unpack() == [[1], [], [2]]
    free_list = by_name["free"].lookup_value("list", None)
    assert free_list.get_type_string() == "av" and free_list.n_children() == 3
    assert free_list.get_child_value(1).get_variant().get_type_string() == "ay"
    assert "gone" not in by_name["free"].unpack()
    assert "optional" not in _types(_wire(Sample, {**dumped, "optional": None}))


def test_results_read_back_as_the_socket_has_them() -> None:
    dumped = Sample.model_validate(FULL).model_dump(mode="json")
    back = codec.result_from_bus(Sample, _wire(Sample, dumped))
    expected = {**dumped, "free": {"list": [1, None, "two"], "nested": {"empty": []}}}
    assert back == expected
    none = Sample.model_validate(EMPTY).model_dump(mode="json")
    assert codec.result_from_bus(Sample, _wire(Sample, none)) == none  # optional: None again


def test_a_value_of_the_wrong_type_is_refused_not_retyped() -> None:
    dumped = Sample.model_validate(EMPTY).model_dump(mode="json")
    with pytest.raises(TypeError, match="Sample.names"):
        codec.result_vardict(Sample, {**dumped, "names": [1]})
    with pytest.raises(TypeError, match="declares no field"):
        codec.result_vardict(Sample, {**dumped, "surprise": 1})


def test_free_form_values_round_trip() -> None:
    value: dict[str, Any] = {"a": [1, 2.5, None, True, "s", [], {}], "b": {"c": [None]}}
    assert free_from_bus(free_variant(value)) == value


def test_undeclarable_types_are_refused() -> None:
    class Odd(BaseModel):
        pair: tuple[int, str]

    with pytest.raises(TypeError, match="Odd"):
        codec.signatures(Odd)


# --- the table the front-end serves -----------------------------------------------------------


class EchoResult(Result):
    said: list[str]


def _echo(family: object, p: NoParams, c: object, emit: object) -> EchoResult:
    return EchoResult(said=[])


def test_bus_methods_come_from_the_table_given_once_per_table() -> None:
    table = {
        "system.echo": Syscall(
            "system.echo", NoParams, EchoResult, Permission.user, _echo, "Echo.", object
        )
    }
    methods = bus_methods(table)
    assert [(i, m) for i, m in methods] == [("org.aiosd.Daemon1.System", "Echo")]
    assert bus_methods(dict(table)) is methods  # the same syscalls: built once
    assert bus_methods() is bus_methods(SYSCALLS)
    assert "Echo" in manager_xml(table) and "Echo" not in manager_xml()
    demo = {"demo.echo": Syscall("demo.echo", NoParams, EchoResult, None, _echo, "Echo.", object)}
    assert list(bus_methods(demo)) == [("org.aiosd.Daemon1.Demo", "Echo")]


class _Paired(Result):
    pair: tuple[int, str]


def test_a_table_whose_result_dbus_cannot_carry_fails_when_its_methods_are_built() -> None:
    table = {
        "demo.pair": Syscall(
            "demo.pair", NoParams, _Paired, Permission.user, _echo, "Pair.", object
        )
    }
    with pytest.raises(TypeError, match="_Paired: no D-Bus type"):
        bus_methods(table)

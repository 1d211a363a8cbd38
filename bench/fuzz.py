"""Hostile input for the socket, generated from the syscall table (the tests and bench use it).

Every syscall of :data:`aiosd.kernel.syscalls.SYSCALLS` has a valid baseline request here
(:func:`baselines`; a syscall without one is an error, so a new syscall is fuzzed the day it
is declared).  From each baseline the generator makes requests with one thing wrong: one
parameter — any field the parameter model declares, or any member nested in the baseline
(``messages.0.content``) — replaced by a wrong type or an edge value, a required parameter
missing, unknown parameters added, ``params`` not an object.  Beside those come malformed
frames: invalid JSON and UTF-8, nesting far beyond the parser's depth, frames over the size
limit, batches, ids of every JSON type, missing or non-string methods.

Everything is drawn from ``random.Random(seed)``: a seed gives the same frames in the same
order, so a failure found once is found again.  :class:`SocketFuzzer` sends the frames one at
a time and checks what the protocol promises of each reply (docs/protocol.md): exactly one
reply per request, with the request's id (null for frames without a usable one), valid JSON,
and never an internal error or a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosd.errors import (
    FrameTooLarge,
    InternalError,
    InvalidRequest,
    MethodNotFound,
    ParseError,
    PermissionDenied,
)
from aiosd.kernel.syscalls import SYSCALLS

#: The default ``[socket] max_frame_bytes``.
MAX_FRAME = 1024 * 1024
#: A generation the fuzzer lets run is at most this many tokens (``llm.chat`` is the one
#: syscall that could legitimately run for long).
MAX_CHAT_TOKENS = 4
MB = 1_000_000
BIG = "x" * MB  # fits a frame of the default limit with room for the envelope


def daemon_config(
    directory: Path,
    *,
    user_group: str = "aios",
    dbus_address: str | None = None,
    storage_quota: int = 128 * 1024 * 1024,
    extra: str = "",
) -> Path:
    """A small daemon for fuzzing: paths in ``directory``, members of ``user_group`` only,
    one slot, short generations by default, small memory budgets."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg = directory / "aiosd.toml"
    cfg.write_text(
        f"""
[daemon]
state_directory = "{directory / "state"}"
runtime_directory = "{directory / "run"}"
log_level = "info"
log_target = "stderr"

[access]
user_group = "{user_group}"
open_to_all = false

[dbus]
enabled = {"true" if dbus_address else "false"}
bus = "{dbus_address or "system"}"

[memory]
budget_bytes = 8388608
max_bytes_per_space = 2097152

[storage]
quota_bytes = {storage_quota}

[shutdown]
drain_timeout = 5.0
close_timeout = 3.0

[llm.models.smollm2]
backend = "llamacpp"
slots = 1
threads = 1
n_ctx = 2048
max_tokens = {MAX_CHAT_TOKENS}
{extra}"""
    )
    return cfg


# --- values ----------------------------------------------------------------------------------

INTS: tuple[int, ...] = (
    0,
    -1,
    1,
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    -(2**63) - 1,
    10**40,
)
#: NaN and the infinities travel as the JSON tokens ``NaN``, ``Infinity``, ``-Infinity``.
FLOATS: tuple[float, ...] = (
    0.0,
    -0.0,
    0.5,
    1.5,
    1e308,
    -1e308,
    5e-324,
    math.nan,
    math.inf,
    -math.inf,
)
STRINGS: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "\udfff",
    "x\udc80y",
    "\n",
    "two\nlines\r\n",
    "\u2028\u2029",
    "\t\x1b[31m",
    "é",
    "日本語のテキスト",
    "\U0001f642" * 50,
    "\ufeff",
    "../../../etc/shadow",
    "%s%n%x",
    "-1",
    "5",
    "true",
    "k" * 257,
    "y" * 10_000,
)


def nested(depth: int, kind: str) -> Any:
    """``depth`` levels of lists (``kind`` "list") or single-member objects ("dict")."""
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


def _value(rng: random.Random, cls: str) -> Any:
    """One value of a class: ``int``, ``float``, ``str``, ``big``, ``wrong`` or ``nest``."""
    if cls == "int":
        return rng.choice(INTS)
    if cls == "float":
        return rng.choice(FLOATS)
    if cls == "str":
        return rng.choice(STRINGS)
    if cls == "big":
        return BIG
    if cls == "nest":
        return nested(rng.choice((10, 40, 300)), rng.choice(("list", "dict")))
    return rng.choice(
        (
            None,
            True,
            False,
            [],
            {},
            [1, "two", None],
            {"a": 1},
            {"": None},
            {"k" * 10_000: 1},
            {"\u00e9\U0001f642": [{}]},
            [[]] * 100,
        )
    )


VALUE_CLASSES = ("int", "float", "str", "big", "wrong", "nest")
#: Draw weights of the classes: 1 MB strings are rarer (they cost a megabyte each).
_CLASS_WEIGHTS = (5, 4, 6, 1, 5, 2)


# --- baselines -------------------------------------------------------------------------------


def baselines(share_group: str) -> dict[str, dict[str, Any]]:
    """A valid request's params for every syscall; ``share_group``: a group of the caller's."""
    note = {"collection": "fuzz", "key": "k"}
    out: dict[str, dict[str, Any]] = {
        "llm.chat": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        "llm.models": {},
        "system.status": {},
        "system.queue": {},
        "storage.put": {**note, "value": "fuzz value", "metadata": {"m": 1, "t": "x"}},
        "storage.get": dict(note),
        "storage.list": {"collection": "fuzz", "prefix": "", "limit": 10},
        "storage.delete": {"collection": "fuzz", "key": "other"},
        "storage.search": {"query": "fuzz", "collection": "fuzz", "limit": 5},
        "storage.history": dict(note),
        "storage.rollback": {**note, "version": 1},
        "storage.share": {"collection": "fuzz", "group": share_group},
        "storage.unshare": {"collection": "fuzz", "group": share_group},
        "storage.usage": {},
        "storage.set_quota": {"user": 0, "quota_entries": 100_000},
        "memory.add": {"content": "fuzz note", "tags": ["t"], "space": "fuzz"},
        "memory.get": {"id": 1, "space": "fuzz"},
        "memory.search": {"query": "fuzz", "space": "fuzz"},
        "memory.update": {"id": 1, "space": "fuzz", "pinned": False},
        "memory.delete": {"id": 2, "space": "fuzz"},
        "memory.clear": {"space": "fuzz-clear"},
        # An AID nobody has: every call on it is refused after validation (spawned agents,
        # with random AIDs, are not the fuzzer's to find).
        "agent.spawn": {"argv": ["/bin/true"], "cwd": "/", "label": "fuzz"},
        "agent.list": {"ended": False},
        "agent.info": {"aid": "000000000000"},
        "agent.stop": {"aid": "000000000000", "timeout": 1},
        "agent.kill": {"aid": "000000000000", "signal": "TERM"},
        "agent.suspend": {"aid": "000000000000"},
        "agent.resume": {"aid": "000000000000"},
        "agent.wait": {"aid": "000000000000", "timeout": 1},
        "agent.logs": {"aid": "000000000000", "tail": 10},
        "agent.available": {},
        # A tool that runs in the daemon and changes nothing (a mutated name is NotFound).
        "tool.call": {"name": "system.info", "arguments": {}, "timeout": 5},
        "tool.list": {},
        "tool.describe": {"name": "fs.read"},
        "tool.pending": {},
        "tool.confirm": {"request": "0123456789abcdef", "allow": False, "remember": "once"},
        "tool.grants": {},
        "tool.revoke": {"name": "fs.write"},
    }
    missing = sorted(set(SYSCALLS) - set(out))
    if missing:
        raise KeyError(f"no fuzzing baseline for syscall(s) {', '.join(missing)}: add one")
    return {name: out[name] for name in SYSCALLS}


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every member path inside a baseline (``("messages", 0, "content")``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of ``value`` with the member at ``path`` replaced (or added) by ``new``."""
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        out = dict(value)
        out[head] = _replace(value.get(head), rest, new)
        return out
    items = list(value)
    items[head] = _replace(items[head], rest, new)
    return items


def _bounded(name: str, params: Any) -> Any:
    """``params`` unless they would start a long generation: then with max_tokens 1.

    The parameter model itself decides: what validates (``"5"`` and ``5.0`` are 5 for a lax
    int) with a max_tokens over :data:`MAX_CHAT_TOKENS`, or none at all (the model's
    default), gets the baseline's bound instead.
    """
    if name != "llm.chat" or not isinstance(params, dict):
        return params
    try:
        p = SYSCALLS[name].params.model_validate(params)
    except Exception:  # pydantic's ValidationError, or anything a hostile value raises
        return params
    tokens = getattr(p, "max_tokens", None)
    if tokens is None or tokens > MAX_CHAT_TOKENS:
        return {**params, "max_tokens": 1}
    return params


# --- cases -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One frame and what the protocol says must come back."""

    label: str
    frame: bytes
    #: The id the reply must carry (None: null).
    req_id: Any
    #: 1, or 0 for a notification and a blank line (nothing may come back).
    replies: int = 1
    #: The daemon closes the connection after the reply (FrameTooLarge).
    closes: bool = False
    #: Error codes the reply may have (None: any reply but an internal error).
    expect: frozenset[int] | None = None
    method: str | None = None
    #: The request's params as sent (for the read-back of a write that succeeded).
    params: Any = None


def _dumps(obj: Any) -> bytes:
    # ASCII escapes carry lone surrogates; NaN and Infinity become their (non-JSON) tokens.
    return json.dumps(obj, ensure_ascii=True, allow_nan=True).encode()


def _request(req_id: Any, method: Any, params: Any = None, *, has_params: bool = True) -> bytes:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
    if has_params:
        msg["params"] = params
    return _dumps(msg) + b"\n"


def _param_case(
    rng: random.Random, n: int, name: str, base: dict[str, Any], kind: str, target: Any = None
) -> Case:
    """A request of syscall ``name`` made from its baseline with one thing wrong."""
    model = SYSCALLS[name].params
    params: Any = base
    if kind == "mutate":
        path, cls = target if target is not None else (None, None)
        if path is None:
            declared = [(k,) for k in model.model_fields]
            path = rng.choice(declared + list(_paths(base)))
        if cls is None:
            cls = rng.choices(VALUE_CLASSES, _CLASS_WEIGHTS)[0]
        value = _value(rng, cls)
        params = _replace(base, path, value)
        what = f"{'.'.join(map(str, path))}={_short(value)}"
    elif kind == "missing":
        required = [k for k, f in model.model_fields.items() if f.is_required()]
        gone = target or rng.choice(required)
        params = {k: v for k, v in base.items() if k != gone}
        what = f"without {gone}"
    elif kind == "extra":
        extra = rng.choice(("uid", "caller", "__class__", "k" * 10_000, "", "\ud800", "x\ny"))
        params = {**base, extra: _value(rng, rng.choice(VALUE_CLASSES[:3]))}
        what = f"extra {_short(extra)}"
    elif kind == "shape":
        params = rng.choice(([], [base], "params", 0, -1.5, True, [None], nested(40, "list")))
        what = f"params={_short(params)}"
    else:
        what = "valid"
    params = _bounded(name, params)
    req_id: Any = n if rng.random() < 0.8 else f"id-{n}"
    frame = _request(req_id, name, params)
    return Case(f"{name} {what}", frame, req_id, method=name, params=params)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} chars)"


_INVALID_REQUEST = frozenset({InvalidRequest.rpc_code})
_PARSE = frozenset({ParseError.rpc_code})
_TOO_LARGE = frozenset({FrameTooLarge.rpc_code})


def usable_id(frame: bytes) -> Any:
    """The id a reply to ``frame`` carries by the protocol: the request's own when it is an
    integer, a string or null, else null (also for a frame that is not a JSON object)."""
    try:
        msg = json.loads(frame.decode())
    except (ValueError, RecursionError):
        return None
    req_id = msg.get("id") if isinstance(msg, dict) else None
    if isinstance(req_id, (str, int)) and not isinstance(req_id, bool):
        return req_id
    return None


def frame_cases(n0: int) -> list[Case]:
    """Every malformed-frame case once, with ids counting from ``n0`` where one is used."""
    c: list[Case] = []
    ok_shape = {"jsonrpc": "2.0", "method": "system.status"}

    def raw(label: str, data: bytes, expect: frozenset[int]) -> None:
        c.append(Case(label, data, usable_id(data), expect=expect))

    # Not JSON, or not UTF-8.
    raw("truncated JSON", b'{"jsonrpc":"2.0","id":1,"method":"system.status"\n', _PARSE)
    raw("trailing garbage", _dumps({**ok_shape, "id": 1}) + b" x\n", _PARSE)
    raw("single quotes", b"{'jsonrpc': '2.0'}\n", _PARSE)
    raw("bare word", b"hello\n", _PARSE)
    raw("invalid UTF-8", b'{"jsonrpc":"2.0","id":1,"method":"\xff\xfe"}\n', _PARSE)
    raw("overlong UTF-8", b'{"jsonrpc":"2.0","id":1,"method":"\xc0\xaf"}\n', _PARSE)
    raw("UTF-8 BOM", b"\xef\xbb\xbf" + _dumps({**ok_shape, "id": 1}) + b"\n", _PARSE)
    raw("UTF-16", json.dumps({**ok_shape, "id": 1}).encode("utf-16") + b"\n", _PARSE)
    raw("NUL byte", b"\x00\n", _PARSE)
    raw("500,000 nested [", b"[" * 500_000 + b"\n", _PARSE)
    raw("500,000 nested {", b'{"a":' * 200_000 + b"\n", _PARSE)
    raw("nested 500,000 ] closed", b"[" * 250_000 + b"]" * 250_000 + b"\n", _PARSE)
    raw("5000-digit number", b"1" * 5000 + b"\n", _PARSE)
    raw("5000-digit id", b'{"jsonrpc":"2.0","method":"system.status","id":' + b"9" * 5000 + b"}\n",
        _PARSE)  # fmt: skip
    # Valid JSON, not a request.
    for label, value in (
        ("empty batch", []),
        ("batch of one", [{**ok_shape, "id": 1}]),
        ("batch of numbers", [1, 2, 3]),
        ("number", 7),
        ("string", "system.status"),
        ("null", None),
        ("empty object", {}),
        ("no jsonrpc", {"id": 1, "method": "system.status"}),
        ("jsonrpc 1.0", {"jsonrpc": "1.0", "id": 1, "method": "system.status"}),
        ("jsonrpc number", {"jsonrpc": 2.0, "id": 1, "method": "system.status"}),
    ):
        raw(label, _dumps(value) + b"\n", _INVALID_REQUEST)
    # Ids of every JSON type: an unusable one is answered with a null id.
    n = n0
    for label, req_id, usable in (
        ("id null", None, True),
        ("id true", True, False),
        ("id 1.5", 1.5, False),
        ("id 1e400", math.inf, False),
        ("id NaN", math.nan, False),
        ("id object", {"a": 1}, False),
        ("id array", [1], False),
        ("id empty string", "", True),
        ("id 2**64", 2**64, True),
        ("id -2**63-1", -(2**63) - 1, True),
        ("id 10**300", 10**300, True),
        ("id lone surrogate", "\ud800", True),
        ("id newline", "a\nb", True),
        ("id 100,000 chars", "i" * 100_000, True),
    ):
        frame = _dumps({**ok_shape, "id": req_id}) + b"\n"
        if usable:
            c.append(Case(label, frame, req_id, method="system.status"))
        else:  # refused at the frame, before anyone's role is looked at
            c.append(Case(label, frame, None, expect=_INVALID_REQUEST))
    bad_methods: tuple[tuple[str, Any], ...] = (
        ("no method", None),
        ("method 5", 5),
        ("method null", None),
        ("method list", ["system.status"]),
        ("method object", {"name": "system.status"}),
        ("method true", True),
    )
    for label, bad in bad_methods:
        n += 1
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": n}
        if label != "no method":
            msg["method"] = bad
        raw(label, _dumps(msg) + b"\n", _INVALID_REQUEST)
    for method in (
        "",
        "system",
        "system.",
        ".status",
        "system.status\n",
        "no\nsuch\r\nmethod",
        "llm.chat\u2028",
        "\x00",
        "\ud800",
        "system.status " * 1000,
        "m" * 100_000,
        "__init__",
        "SYSTEM.STATUS",
    ):
        n += 1
        c.append(
            Case(
                f"unknown method {_short(method)}",
                _request(n, method, {}),
                n,
                expect=frozenset({MethodNotFound.rpc_code}),
                method=method,
            )
        )
    # Frames the protocol says nothing comes back for.
    c.append(Case("blank line", b"   \r\n", None, replies=0))
    c.append(Case("notification", _dumps(ok_shape) + b"\n", None, replies=0))
    c.append(
        Case(
            "notification storage.put",
            _dumps({**ok_shape, "method": "memory.add", "params": {"content": "n"}}) + b"\n",
            None,
            replies=0,
        )
    )
    c.append(
        Case(
            "notification of nothing",
            _dumps({**ok_shape, "method": "no.such"}) + b"\n",
            None,
            replies=0,
        )
    )
    # Duplicate members: the last one counts (Python's parser), and the request is served.
    n += 1
    dup = f'{{"jsonrpc":"2.0","id":{n},"id":{n + 1},"method":"x","method":"system.status"}}\n'
    c.append(Case("duplicate members", dup.encode(), n + 1, method="system.status"))
    n += 2
    # Over the size limit: one error with a null id, then the daemon closes.
    big = {
        "jsonrpc": "2.0",
        "id": n,
        "method": "memory.add",
        "params": {"content": "z" * MAX_FRAME},
    }
    c.append(
        Case("frame over the limit", _dumps(big) + b"\n", None, closes=True, expect=_TOO_LARGE)
    )
    c.append(
        Case(
            "frame over the limit without newline",
            b"[" + b" " * (MAX_FRAME + 16),
            None,
            closes=True,
            expect=_TOO_LARGE,
        )
    )
    return c


def read_back(case: Case, result: Any) -> Case | None:
    """For a write that succeeded, the request that reads it back: what the daemon stored
    must come back as a valid reply (a value it accepted but cannot send is a failure)."""
    p = case.params
    if not isinstance(p, dict) or not isinstance(result, dict) or case.label.startswith("read"):
        return None
    if case.method == "storage.put":
        params = {"collection": p.get("collection"), "key": p.get("key")}
        method = "storage.get"
    elif case.method in ("memory.add", "memory.update") and "id" in result:
        params = {"id": result["id"], "space": result.get("space")}
        method = "memory.get"
    else:
        return None
    req_id = f"read-{case.req_id!s:.20}"
    return Case(f"read back {case.label}", _request(req_id, method, params), req_id,
                method=method, params=params)  # fmt: skip


@dataclass
class Plan:
    """Which cases to make: ``count`` frames from ``seed``, as a user with or without a role."""

    seed: int
    count: int
    share_group: str = "aios"
    #: The caller has no role: every request must be refused with PermissionDenied.
    no_role: bool = False


def cases(plan: Plan) -> Iterator[Case]:
    """The plan's frames, lazily (each big frame is built when it is sent).

    First every declared field of every syscall once per value class, every required field
    missing once and every malformed frame once; then random draws until ``count``.
    """
    rng = random.Random(plan.seed)
    base = baselines(plan.share_group)
    names = list(base)
    n = 0
    sweep: list[tuple[str, str, Any]] = []
    for name in names:
        sweep.append((name, "valid", None))
        model = SYSCALLS[name].params
        for k in model.model_fields:
            for cls in VALUE_CLASSES:
                if cls != "big" or k in base[name]:
                    sweep.append((name, "mutate", ((k,), cls)))
        for k, f in model.model_fields.items():
            if f.is_required():
                sweep.append((name, "missing", k))
        sweep.append((name, "extra", None))
        sweep.append((name, "shape", None))
    frames = frame_cases(10**6)
    # Interleave the frame cases with the sweep so that a short plan still has both kinds.
    every = max(1, len(sweep) // max(1, len(frames)))
    out_frames = iter(frames)
    for i, (name, kind, target) in enumerate(sweep):
        if n >= plan.count:
            return
        n += 1
        yield _role(plan, _param_case(rng, n, name, base[name], kind, target))
        if i % every == every - 1 and (fc := next(out_frames, None)) is not None and n < plan.count:
            n += 1
            yield _role(plan, fc)
    for fc in out_frames:
        if n >= plan.count:
            return
        n += 1
        yield _role(plan, fc)
    kinds = ("mutate", "missing", "extra", "shape", "valid")
    while n < plan.count:
        n += 1
        if rng.random() < 0.12:
            yield _role(plan, rng.choice(frames))
            continue
        name = rng.choice(names)
        kind = rng.choices(kinds, (70, 6, 8, 4, 12))[0]
        if kind == "missing" and not any(
            f.is_required() for f in SYSCALLS[name].params.model_fields.values()
        ):
            kind = "mutate"
        if kind == "mutate" and not SYSCALLS[name].params.model_fields:
            kind = "extra"
        yield _role(plan, _param_case(rng, n, name, base[name], kind))


def _role(plan: Plan, case: Case) -> Case:
    """For a caller with no role, every request that reaches dispatch is PermissionDenied."""
    if not plan.no_role or case.method is None or case.replies == 0:
        return case
    return dataclasses.replace(case, expect=frozenset({PermissionDenied.rpc_code}))


# --- running ---------------------------------------------------------------------------------


@dataclass
class Failure:
    """One broken promise: which case, what went wrong, what came back."""

    case: str
    what: str
    detail: str = ""

    def render(self) -> str:
        """One line (the detail cut short)."""
        return f"{self.what}: {self.case}" + (f" -> {self.detail[:300]}" if self.detail else "")


@dataclass
class Tally:
    """What a fuzzing run saw."""

    sent: int = 0
    #: Frames that must get exactly one reply (all but notifications and blank lines), and
    #: the replies that came.
    expected: int = 0
    replies: int = 0
    #: ``ok``, or the error code and its name (``-32602 InvalidParams``), per reply.
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    #: Connections closed by the daemon as the protocol says (FrameTooLarge), and reconnects.
    closes: int = 0
    reconnects: int = 0
    seconds: float = 0.0

    def internal_errors(self) -> int:
        """Replies that were internal errors."""
        return sum(n for k, n in self.outcomes.items() if k.startswith(f"{InternalError.rpc_code}"))

    def summary(self) -> str:
        """Counts per outcome, one line."""
        counts = ", ".join(f"{k}: {n}" for k, n in sorted(self.outcomes.items()))
        return (
            f"{self.sent} frames, {self.replies} replies in {self.seconds:.1f} s; {counts}; "
            f"{len(self.failures)} failures; {self.closes} closes, {self.reconnects} reconnects"
        )


def _strict(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _code_name(code: int) -> str:
    from aiosd.errors import error_for_code

    return type(error_for_code(code, "")).__name__


def _same_id(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


class SocketFuzzer:
    """Sends cases one at a time on a connection ``connect()`` opens, and checks each reply."""

    PROBE = "fuzz-probe"

    def __init__(self, connect: Callable[[], socket.socket], reply_timeout: float = 120.0):
        self.connect = connect
        self.reply_timeout = reply_timeout
        self.sock: socket.socket | None = None
        self.file: Any = None
        self.tally = Tally()

    def _open(self) -> None:
        self.close()
        self.sock = self.connect()
        self.sock.settimeout(self.reply_timeout)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        """Close the current connection."""
        if self.file is not None:
            self.file.close()
        if self.sock is not None:
            self.sock.close()
        self.sock = self.file = None

    def run(self, todo: Iterable[Case], progress: Callable[[int], None] | None = None) -> Tally:
        """Send every case; return the tally (also kept in ``self.tally``)."""
        t0 = time.monotonic()
        try:
            for case in todo:
                if self.sock is None:
                    self._open()
                    if self.tally.sent:
                        self.tally.reconnects += 1
                self._one(case)
                if progress is not None:
                    progress(self.tally.sent)
        finally:
            self.tally.seconds += time.monotonic() - t0
        return self.tally

    def _one(self, case: Case) -> None:
        t = self.tally
        assert self.sock is not None
        t.sent += 1
        t.expected += case.replies
        data = case.frame
        if case.replies == 0:
            data += _request(self.PROBE, "system.status", None, has_params=False)
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            if not case.closes:
                t.failures.append(Failure(case.label, "connection dropped while sending", str(exc)))
                self.close()
                return
        want_id = self.PROBE if case.replies == 0 else case.req_id
        while True:
            try:
                frame = self._read(case)
            except TimeoutError:
                t.failures.append(Failure(case.label, "no reply", f"{self.reply_timeout} s"))
                self.close()
                return
            if frame is None:
                return
            if (
                frame.get("method") == "stream"
                and isinstance(frame.get("params"), dict)
                and _same_id(frame["params"].get("id"), want_id)
                and case.replies
            ):
                continue
            break
        if not _same_id(frame.get("id"), want_id):
            what = "reply to a notification" if case.replies == 0 else "wrong id"
            t.failures.append(
                Failure(case.label, what, f"expected {want_id!r:.80}: {frame!r:.300}")
            )
            self.close()  # the stream of replies is out of step: start afresh
            return
        if case.replies == 0:
            return  # the probe's reply came next: nothing was sent for the case
        t.replies += 1
        self._check(case, frame)
        if case.closes:
            self._expect_close(case)
        elif "result" in frame and (back := read_back(case, frame["result"])) is not None:
            self._one(back)

    def _read(self, case: Case) -> dict[str, Any] | None:
        """The next frame from the daemon, checked to be JSON; None after a failure."""
        t = self.tally
        line = self.file.readline()
        if not line:
            t.failures.append(Failure(case.label, "connection dropped"))
            self.close()
            return None
        try:
            frame = json.loads(line.decode("utf-8"), parse_constant=_strict)
        except ValueError as exc:
            t.failures.append(Failure(case.label, "reply is not JSON", f"{exc}: {line[:200]!r}"))
            self.close()
            return None
        if not isinstance(frame, dict) or frame.get("jsonrpc") != "2.0":
            t.failures.append(Failure(case.label, "reply is not JSON-RPC", repr(frame)[:300]))
            self.close()
            return None
        return frame

    def _check(self, case: Case, frame: dict[str, Any]) -> None:
        t = self.tally
        has_result, has_error = "result" in frame, "error" in frame
        if has_result == has_error:
            t.failures.append(Failure(case.label, "neither result nor error", repr(frame)[:300]))
            return
        if has_result:
            t.outcomes["ok"] += 1
            if case.expect is not None:
                t.failures.append(Failure(case.label, "served, expected an error", str(frame)))
            return
        err = frame["error"]
        if not (
            isinstance(err, dict)
            and isinstance(err.get("code"), int)
            and isinstance(err.get("message"), str)
        ):
            t.failures.append(Failure(case.label, "malformed error", repr(frame)[:300]))
            return
        code = err["code"]
        t.outcomes[f"{code} {_code_name(code)}"] += 1
        if code == InternalError.rpc_code:
            t.failures.append(Failure(case.label, "internal error", err["message"]))
        elif case.expect is not None and code not in case.expect:
            wanted = "/".join(str(c) for c in sorted(case.expect))
            t.failures.append(Failure(case.label, f"error {code}, expected {wanted}", str(err)))
        if "Traceback" in json.dumps(frame) or 'File "' in err["message"]:
            t.failures.append(Failure(case.label, "traceback in a reply", err["message"]))

    def _expect_close(self, case: Case) -> None:
        try:
            rest = self.file.readline()
        except ConnectionResetError:
            # Closed with some of the client's bytes still unread in the daemon's buffer: the
            # kernel resets such a connection rather than ending it, and that is a close too.
            rest = b""
        except (TimeoutError, OSError) as exc:
            rest = repr(exc).encode()
        if rest:
            t = self.tally
            t.failures.append(Failure(case.label, "not closed after FrameTooLarge", repr(rest)))
        self.tally.closes += 1
        self.close()

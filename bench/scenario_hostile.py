"""Scenario ``hostile``: one member holds all it can; is another member still served as fast?

The hostile member takes the maximum of every resource the daemon lets a user hold: socket
connections (until ``TooManyConnections``), queued LLM requests (64-token generations, 16 per
connection, until ``Busy``), pinned short-term memory (until ``QuotaExceeded``), storage (until
``QuotaExceeded``; the quota is 16 MiB here) and stalled readers (connections that ask for
256 KiB values and never read).  Meanwhile the other member times ``llm.chat`` (4 tokens),
``storage.put`` + ``storage.get`` and ``memory.add`` + ``memory.get`` on the connection it had;
and opens a new connection.  The baseline is the same calls on the same daemon while it was
idle, just before, in the same run.  Goal: the p50 of each at most 1.5x idle.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from bench.common import Goal, Options, Report, Table, median, ratio
from bench.fuzz_env import Setting, setting
from bench.peer import Peer
from bench.scenario_rss import _Rpc

STORY = "Write a very long story about a lighthouse keeper and the sea."
BIG = "b" * (256 * 1024)
#: Error counts by code.
Counter_ = dict[str, int]


def _victim_ops(v: _Rpc) -> dict[str, Callable[[int], dict[str, Any]]]:
    chat = {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 4}

    def storage(i: int) -> dict[str, Any]:
        v.call("storage.put", {"collection": "victim", "key": f"k{i % 20}", "value": "v" * 500})
        return v.call("storage.get", {"collection": "victim", "key": f"k{i % 20}"})

    def memory(i: int) -> dict[str, Any]:
        added = v.call("memory.add", {"content": f"note {i}", "space": "victim"})
        if "result" not in added:
            return added
        return v.call("memory.get", {"id": added["result"]["id"], "space": "victim"})

    return {"llm.chat": lambda i: v.call("llm.chat", chat), "storage": storage, "memory": memory}


def _time(ops: dict[str, Callable[[int], dict[str, Any]]], n: int, budget: float
          ) -> dict[str, tuple[list[float], Counter_]]:  # fmt: skip
    """Latencies of ``n`` calls of each op (fewer if an op's calls exceed ``budget`` seconds)."""
    out: dict[str, tuple[list[float], Counter_]] = {}
    for name, op in ops.items():
        lat: list[float] = []
        errors: Counter_ = {}
        spent = 0.0
        for i in range(n):
            t0 = time.perf_counter()
            try:
                reply = op(i)
            except TimeoutError:
                reply = {"error": {"code": "timeout"}}
            dt = time.perf_counter() - t0
            spent += dt
            if "result" in reply:
                lat.append(dt)
            else:
                code = str(reply["error"]["code"])
                errors[code] = errors.get(code, 0) + 1
            if spent > budget:
                break
        out[name] = (lat, errors)
    return out


def _frame(req_id: int, method: str, params: dict[str, Any]) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": req_id, "method": method, "params": params}
                      ).encode() + b"\n"  # fmt: skip


def _pending(sock: socket.socket, wait: float = 0.0) -> bytes:
    """What the daemon has sent on ``sock`` so far (non-blocking)."""
    sock.settimeout(wait)
    try:
        return sock.recv(1 << 16)
    except (TimeoutError, BlockingIOError):
        return b""
    except OSError:
        return b"<closed>"


@contextlib.contextmanager
def _hold(s: Setting, held: dict[str, str]) -> Iterator[None]:
    """The hostile member takes its maximum of everything; released when the block ends."""
    peers: list[Peer] = []
    socks: list[socket.socket] = []
    try:
        attacker = Peer(s.member, s.socket_path, count=300)
        peers.append(attacker)
        socks = [socket.socket(fileno=fd) for fd in attacker.fds]
        time.sleep(1.0)  # let the daemon accept (and refuse) them all
        alive = []
        for sk in socks:
            got = _pending(sk)
            if b"-32009" not in got and got != b"<closed>":
                alive.append(sk)
        held["connections"] = f"{len(alive)} of 300 (then TooManyConnections)"
        if len(alive) < 30:
            raise RuntimeError(f"only {len(alive)} connections admitted")
        control, storers, stalled, chats = alive[0], alive[1], alive[2:12], alive[12:]
        control.settimeout(60)
        storers.settimeout(60)
        # Short-term memory: pinned entries (never evicted) in many spaces, until refused.
        rpc = _Rpc(control)
        total, why = 0, "no refusal in 400 adds"
        for i in range(400):
            r = rpc.call("memory.add", {"content": "m" * 60_000, "pinned": True,
                                        "space": f"hog-{i}"})  # fmt: skip
            if "error" in r:
                why = f"{r['error']['code']} after {total} bytes"
                break
            total += 60_000
        held["memory (pinned)"] = why
        # Storage up to the quota.
        put = _Rpc(storers)
        total, why = 0, "no refusal in 200 puts"
        for i in range(200):
            r = put.call("storage.put", {"collection": "hog", "key": f"k{i}", "value": BIG})
            if "error" in r:
                why = f"{r['error']['code']} after {total} bytes"
                break
            total += len(BIG)
        held["storage"] = why
        # Stalled readers: ask for big values, never read the answers.
        for sk in stalled:
            sk.settimeout(5)
            with contextlib.suppress(OSError):
                sk.sendall(b"".join(_frame(i, "storage.get", {"collection": "hog", "key": "k0"})
                                    for i in range(16)))  # fmt: skip
        held["stalled readers"] = f"{len(stalled)} connections x 16 x 256 KiB unread"
        held["connections"] += f"; {len(stalled)} stalled, {len(chats)} with chats"
        # Queued generations, up to 16 per connection (the in-flight limit), until Busy.
        params = {"messages": [{"role": "user", "content": STORY}], "max_tokens": 64}
        sent = refused = 0
        for sk in chats:
            with contextlib.suppress(OSError):
                sk.sendall(b"".join(_frame(i, "llm.chat", params) for i in range(16)))
                sent += 16
            time.sleep(0.2)
            got = _pending(sk, 0.2)
            refused += got.count(b'"code":-32002') + got.count(b'"code":-32008')
            if refused:
                break
        held["queued llm.chat"] = f"{sent} sent, {sent - refused} held, {refused} refused"
        yield
    finally:
        for sk in socks:
            sk.close()
        for p in peers:
            p.close()


def run(opts: Options) -> Report:
    """Measure and report."""
    n, budget = (30, 120.0) if not opts.quick else (8, 40.0)
    report = Report("hostile")
    held: dict[str, str] = {}
    with setting(opts.workdir, storage_quota=16 * 1024 * 1024) as s:
        victim = Peer(s.other, s.socket_path)
        v = _Rpc(victim.socket(timeout=120))
        try:
            ops = _victim_ops(v)
            _time(ops, 3, budget)  # warm-up
            idle = _time(ops, n, budget)
            with _hold(s, held):
                try:
                    with Peer(s.other, s.socket_path) as fresh:
                        f = _Rpc(fresh.socket(timeout=30))
                        reply = f.call("system.status", {})
                        f.close()
                    held["victim's new connection"] = (
                        "served" if "result" in reply else f"refused {reply['error']['code']}"
                    )
                except (OSError, ValueError) as exc:
                    held["victim's new connection"] = f"failed: {exc}"
                hostile = _time(ops, n, budget)
        finally:
            v.close()
            victim.close()
    holdings = Table("what the hostile member holds", ["resource", "held / refused with"])
    for k, text in held.items():
        holdings.add(k, text)
    table = Table(
        f"the other member's calls: {n} each, idle vs while the hostile member holds its all",
        ["call", "idle p50 ms", "hostile p50 ms", "ratio", "idle ok/errors", "hostile ok/errors"],
    )
    for name in idle:
        (a, ea), (b, eb) = idle[name], hostile[name]
        r = ratio(median(b), median(a)) if b else float("inf")
        table.add(name, median(a) * 1e3, median(b) * 1e3 if b else float("nan"), r,
                  f"{len(a)}/{ea or 0}", f"{len(b)}/{eb or 0}")  # fmt: skip
        report.goals.append(Goal(f"{name} p50 hostile/idle", r, "<= 1.5", r <= 1.5))
    report.tables += [holdings, table]
    served = held.get("victim's new connection") == "served"
    report.goals.append(Goal("other member's new connection served", float(served), "1", served))
    return report

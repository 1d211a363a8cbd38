"""Scenario ``tools``: what a tool call costs, and how well the embedded model uses tools.

1. **``tool.call`` of a trivial built-in.**  ``fs.stat`` of the member's home, through the
   daemon (validation, consent check, the member's warm worker process: one JSON line each
   way, audit) as a member's connection makes it, against the same function
   (``aiosd.osbridge.files.fs_stat``) called in this process, alternating in the same run.
   Goal: ≤ 2 ms added at p50.
2. **An MCP tool call.**  ``echo`` of tests/mcp_server.py (an MCP server written with the
   ``mcp`` SDK), through aiosd (``tool.call`` of ``bench.echo``: the member's own instance of
   the server, started as them), against the same call from a direct ``mcp`` client session
   with the same server started by this process, alternating.  Goal: ≤ 1.2× (p50).
3. **The task set** (``bench/tool_tasks.py``): OS questions and actions put to the embedded
   model through the tool loop of ``llm.chat`` (``use_tools``), each checked against what the
   model did (the tool it called, its arguments) and said.  Reported: solved/total and the
   most common failure.  Figures only: a 135M model is expected to fail many.
"""

from __future__ import annotations

import collections
import json
import os
import pwd
import sys
import time
from pathlib import Path

from bench import tool_tasks
from bench.common import REPO, Goal, Options, Report, Table, median, percentile
from bench.fuzz_env import setting
from bench.peer import Peer
from bench.scenario_rss import _Rpc

SERVER = [sys.executable, str(REPO / "tests" / "mcp_server.py")]
MCP_EXTRA = (
    "\n[tools.mcp.bench]\ncommand = [" + ", ".join(json.dumps(w) for w in SERVER) + "]\n"
    "trusted = true\n"
)


#: Seconds each call through aiosd spent in the tool itself (its ``elapsed_ms``).
inside: list[float] = []
stat_inside: list[float] = []


def _mcp_calls(rpc: _Rpc, reps: int) -> tuple[list[float], list[float]]:
    """``echo`` through aiosd and through a direct session, alternating: (via, direct)."""
    import asyncio

    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = {"name": "bench.echo", "arguments": {"text": "ping"}}
    via: list[float] = []
    direct: list[float] = []

    async def main() -> None:
        server = StdioServerParameters(command=SERVER[0], args=SERVER[1:])
        async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            for _ in range(20):  # warm both
                await session.call_tool("echo", {"text": "ping"})
                assert rpc.call("tool.call", params)["result"]["ok"]
            for i in range(reps):
                for which in (0, 1) if i % 2 == 0 else (1, 0):
                    t = time.perf_counter()
                    if which == 0:
                        # (a blocking call on this thread: nothing else runs meanwhile)
                        reply = rpc.call("tool.call", params)
                        via.append(time.perf_counter() - t)
                        assert reply["result"]["ok"], reply
                        inside.append(reply["result"]["elapsed_ms"] / 1e3)
                    else:
                        await session.call_tool("echo", {"text": "ping"})
                        direct.append(time.perf_counter() - t)

    asyncio.run(main())
    return via, direct


def _home_of(uid: int, gid: int) -> Path:
    """The member's home, made (0700, theirs) if the account has none yet."""
    home = Path(pwd.getpwuid(uid).pw_dir)
    if not home.is_dir():
        home.mkdir(mode=0o700, parents=True)
        os.chown(home, uid, gid)
    return home


def run(opts: Options) -> Report:
    """Measure and report."""
    from aiosd.osbridge import files

    report = Report("tools")
    reps = opts.reps(2000, 200)
    mcp_direct: list[float] = []
    mcp_via: list[float] = []
    with setting(opts.workdir, extra=tool_tasks.DAEMON_EXTRA + MCP_EXTRA) as s:
        home = _home_of(s.member.uid, s.member.gid)
        tool_tasks.prepare(home, s.member.uid, s.member.gid)
        with Peer(s.member, s.socket_path) as peer:
            rpc = _Rpc(peer.socket(timeout=600))
            try:
                params = {"name": "fs.stat", "arguments": {"path": str(home)}}
                for _ in range(50):  # warm: the worker starts on the first call
                    assert rpc.call("tool.call", params)["result"]["ok"]
                via: list[float] = []
                direct: list[float] = []
                for i in range(reps):
                    for which in (0, 1) if i % 2 == 0 else (1, 0):
                        t = time.perf_counter()
                        if which == 0:
                            reply = rpc.call("tool.call", params)
                            via.append(time.perf_counter() - t)
                            stat_inside.append(reply["result"]["elapsed_ms"] / 1e3)
                        else:
                            files.fs_stat(str(home))
                            direct.append(time.perf_counter() - t)
                mcp_via, mcp_direct = _mcp_calls(rpc, opts.reps(500, 50))
                results = tool_tasks.run_all(rpc, home)
            finally:
                rpc.close()
    t = Table(f"fs.stat of a home, {reps} of each, alternating", ["path", "p50 µs", "p99 µs"])
    t.add("tool.call through aiosd (member's connection, warm worker)",
          median(via) * 1e6, percentile(via, 99) * 1e6)  # fmt: skip
    t.add("  of which the tool itself, worker hop included (elapsed_ms)",
          median(stat_inside) * 1e6, percentile(stat_inside, 99) * 1e6)  # fmt: skip
    t.add("fs_stat() in-process (baseline)", median(direct) * 1e6, percentile(direct, 99) * 1e6)
    added = (median(via) - median(direct)) * 1e3
    report.tables.append(t)
    report.goals.append(Goal("tool.call added latency p50, ms", added, "<= 2", added <= 2))

    m = Table(
        f"MCP tool call (echo), {len(mcp_via)} of each, alternating",
        ["path", "p50 µs", "p99 µs"],
    )
    m.add("tool.call through aiosd", median(mcp_via) * 1e6, percentile(mcp_via, 99) * 1e6)
    m.add("  of which the daemon's MCP round trip (elapsed_ms)", median(inside) * 1e6,
          percentile(inside, 99) * 1e6)  # fmt: skip
    m.add("direct mcp ClientSession (baseline)", median(mcp_direct) * 1e6,
          percentile(mcp_direct, 99) * 1e6)  # fmt: skip
    report.tables.append(m)
    r = median(mcp_via) / median(mcp_direct)
    report.goals.append(Goal("MCP call through aiosd / direct, p50", r, "<= 1.2", r <= 1.2))

    tasks = Table(
        "task set through the tool loop (embedded model, greedy)",
        ["task", "solved", "of", "calls made", "failure"],
    )
    solved = total = 0
    failures: collections.Counter[str] = collections.Counter()
    for name, outcomes in results.items():
        ok = sum(1 for o in outcomes if o.solved)
        solved += ok
        total += len(outcomes)
        for o in outcomes:
            if not o.solved:
                failures[o.failure] += 1
        calls = "; ".join(o.calls for o in outcomes)
        worst = collections.Counter(o.failure for o in outcomes if not o.solved).most_common(1)
        tasks.add(name, ok, len(outcomes), calls, worst[0][0] if worst else "")
    report.tables.append(tasks)
    common = failures.most_common(1)
    report.notes.append(
        f"task set: {solved}/{total} solved; most common failure: "
        f"{common[0][0] + f' ({common[0][1]})' if common else 'none'}"
    )
    return report

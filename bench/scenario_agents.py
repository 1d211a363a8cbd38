"""Scenario ``agents``: what starting an agent, and recognising it on every call, cost.

1. **Spawn → first syscall answered.**  A small program (the system Python, isolated) connects
   to the daemon, makes ``system.status`` and prints ``time.monotonic()`` once it has the
   reply.  Started by ``agent.spawn`` (from a member's connection: the clock starts before the
   request is sent), and as the baseline by ``fork+exec`` of the same program as the same user
   from this process (``subprocess.Popen`` with the user's uid, gid and groups: the clock
   starts before ``Popen``), alternating, in the same run.  Goal: p50 overhead ≤ 50 ms.
2. **Attribution, warm.**  An agent's connection is attributed once, when it connects; each
   call then costs what the kernel does for an agent's call (counting it).  The same program
   makes 2000 ``system.status`` calls on one connection and prints their median, run as an
   agent and as a plain process of the same user, alternating.  Goal: ≤ 5 µs per call more.
3. **Attribution, cold.**  What recognising a new connection's process costs: the backend's
   ``identify`` (reads of /proc) timed in this process, for a process of an agent's session,
   one that left the session (found through its parent), and a process that is no agent's
   (its whole ancestry read).  Figures only.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import Goal, Options, Report, Table, median, percentile
from bench.fuzz_env import setting
from bench.peer import Identity, Peer
from bench.scenario_rss import _Rpc

FIRST_CALL = """
import os, socket, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["AIOSD_SOCKET"])
s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"system.status"}\\n')
s.makefile("rb").readline()
print(time.monotonic(), flush=True)
"""

MANY_CALLS = """
import os, socket, statistics, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["AIOSD_SOCKET"])
f = s.makefile("rb")
frame = b'{"jsonrpc":"2.0","id":1,"method":"system.status"}\\n'
lat = []
for i in range(2200):
    t = time.perf_counter()
    s.sendall(frame)
    f.readline()
    lat.append(time.perf_counter() - t)
print(statistics.median(lat[200:]) * 1e6, flush=True)
"""

PY = "/usr/bin/python3"


def _direct(who: Identity, socket_path: Path, program: str) -> tuple[float, str]:
    """Run ``program`` as ``who`` by fork+exec: (the time it started, its first line)."""
    t0 = time.monotonic()
    out = subprocess.run(
        [PY, "-I", "-S", "-c", program],
        user=who.uid,
        group=who.gid,
        extra_groups=list(who.groups),
        env={"AIOSD_SOCKET": str(socket_path), "PATH": "/usr/bin:/bin"},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return t0, out.stdout.split("\n", 1)[0]


def _as_agent(rpc: _Rpc, program: str) -> tuple[float, str]:
    """Run ``program`` as an agent of ``rpc``'s user: (the time it was asked, its first line)."""
    t0 = time.monotonic()
    spawned = rpc.call("agent.spawn", {"argv": [PY, "-I", "-S", "-c", program], "cwd": "/"})
    aid = spawned["result"]["aid"]
    done = rpc.call("agent.wait", {"aid": aid, "timeout": 120})["result"]
    if done["exit_code"] != 0:
        raise RuntimeError(f"the agent failed: {done['reason']}")
    lines = rpc.call("agent.logs", {"aid": aid, "tail": 10})["result"]["lines"]
    return t0, lines[0]["text"]


def _identify_costs(member: Identity) -> dict[str, float]:
    """µs per identify() of the subprocess backend, for three kinds of process."""
    from aiosd.config import AgentsConfig
    from aiosd.kernel.agents import Launch, Limits
    from aiosd.osbridge import proc
    from aiosd.osbridge.agents_subprocess import SubprocessBackend
    from aiosd.osbridge.executor import UnixAccount, user_environment

    async def main() -> dict[str, float]:
        backend = SubprocessBackend(AgentsConfig(), Path(tempfile.mkdtemp(prefix="aiosd-id-")))
        backend.on_exit = lambda *_a: None
        await backend.open([])
        account = UnixAccount.of(member.uid)
        program = "sleep 60 & setsid sleep 61 & wait"
        pid = await backend.launch(
            Launch(
                "bench",
                account,
                ["/bin/sh", "-c", program],
                "/",
                user_environment(account, {}, {}),
                Limits(),
            )
        )
        kinds: dict[str, int] = {}
        deadline = time.monotonic() + 10
        while len(kinds) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            for s in proc.all_stats():
                if s.ppid == pid:
                    kinds["in its session" if s.session == pid else "left its session"] = s.pid
        kinds["no agent's"] = os.getpid()
        out = {}
        for kind, p in kinds.items():
            n = 3000
            t = time.perf_counter()
            for _ in range(n):
                backend.identify(p, member.uid)
            out[kind] = (time.perf_counter() - t) / n * 1e6
            expect = None if kind == "no agent's" else "bench"
            got = backend.identify(p, member.uid)
            if got != expect:
                raise RuntimeError(f"identify({kind}) gave {got!r}, not {expect!r}")
        os.killpg(pid, 9)
        await asyncio.sleep(0.2)
        await backend.close()
        return out

    return asyncio.run(main())


def run(opts: Options) -> Report:
    """Measure and report."""
    reps = opts.reps(30, 6)
    report = Report("agents")
    spawn: list[float] = []
    direct: list[float] = []
    warm_agent: list[float] = []
    warm_plain: list[float] = []
    with setting(opts.workdir) as s:
        with Peer(s.member, s.socket_path) as peer:
            rpc = _Rpc(peer.socket(timeout=180))
            try:
                _as_agent(rpc, FIRST_CALL)  # warm-up of both paths
                _direct(s.member, s.socket_path, FIRST_CALL)
                for i in range(reps):
                    order = (0, 1) if i % 2 == 0 else (1, 0)
                    for which in order:
                        if which == 0:
                            t0, line = _as_agent(rpc, FIRST_CALL)
                            spawn.append(float(line) - t0)
                        else:
                            t0, line = _direct(s.member, s.socket_path, FIRST_CALL)
                            direct.append(float(line) - t0)
                for i in range(opts.reps(5, 2)):
                    for which in (0, 1) if i % 2 == 0 else (1, 0):
                        if which == 0:
                            warm_agent.append(float(_as_agent(rpc, MANY_CALLS)[1]))
                        else:
                            warm_plain.append(
                                float(_direct(s.member, s.socket_path, MANY_CALLS)[1])
                            )
            finally:
                rpc.close()
        cold = _identify_costs(s.member)
    table = Table(
        f"spawn -> first syscall answered, {reps} of each, alternating",
        ["started by", "p50 ms", "p99 ms", "min ms"],
    )
    for name, xs in (("agent.spawn", spawn), ("fork+exec (baseline)", direct)):
        table.add(name, median(xs) * 1e3, percentile(xs, 99) * 1e3, min(xs) * 1e3)
    overhead = (median(spawn) - median(direct)) * 1e3
    warm = Table(
        "per-call latency of system.status on one connection (median of 2000 calls, per run)",
        ["caller", "runs", "median of runs µs"],
    )
    warm.add("agent", len(warm_agent), median(warm_agent))
    warm.add("plain process of the same user", len(warm_plain), median(warm_plain))
    extra = median(warm_agent) - median(warm_plain)
    cold_t = Table("identify() of a new connection's process, in-process", ["process", "µs"])
    for kind, us in cold.items():
        cold_t.add(kind, us)
    report.tables += [table, warm, cold_t]
    report.goals.append(
        Goal("spawn overhead p50 over fork+exec, ms", overhead, "<= 50", overhead <= 50)
    )
    report.goals.append(Goal("attribution per call, warm, µs", extra, "<= 5", extra <= 5))
    report.notes.append(
        "the spawn path includes the wrappers (setpriv, env, prlimit), the record written to "
        "agents.sqlite, and agent.wait/agent.logs round trips after the program's clock stops"
    )
    return report

"""Scenario ``rpc``: ``system.status`` round trips vs a raw asyncio JSON echo server.

The same minimal client (one asyncio connection per simulated caller, sequential calls on
each) drives the daemon and ``bench/echo_server.py`` in turn, with 1 and with 32 concurrent
connections, for a fixed time after a warm-up; rounds alternate the two servers.  Besides
client-side latency and throughput it records each server's CPU time per call (psutil), which
does not depend on how fast the client can drive it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from bench.common import Goal, Options, Report, Table, loadavg, median, percentile, ratio
from bench.procs import DaemonProcess, NotifiedProcess

CONCURRENCY = (1, 32)
PROTO = "echo (Protocol)"
FRAME = '{{"jsonrpc":"2.0","id":{id},"method":"system.status"}}\n'


@dataclass
class Measurement:
    """One timed window against one server."""

    latencies: list[float] = field(default_factory=list)
    calls: int = 0
    elapsed: float = 0.0
    server_cpu: float = 0.0  # server CPU seconds (user+system) in the window
    client_cpu: float = 0.0  # this process's CPU seconds in the window

    @property
    def calls_per_s(self) -> float:
        """Completed calls per second of the window."""
        return self.calls / self.elapsed if self.elapsed else 0.0


async def _caller(
    path: Path, window: tuple[float, float], out: Measurement, ends: list[float]
) -> None:
    start, deadline = window
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        req = 0
        while (t0 := time.perf_counter()) < deadline:
            req += 1
            writer.write(FRAME.format(id=req).encode())
            await writer.drain()
            msg = json.loads(await reader.readline())
            t1 = time.perf_counter()
            if msg.get("id") != req or "result" not in msg:
                raise RuntimeError(f"unexpected reply: {msg}")
            if t0 >= start:
                out.latencies.append(t1 - t0)
                out.calls += 1
                ends.append(t1)
    finally:
        writer.close()


async def _measure(path: Path, pid: int, conns: int, warmup: float, duration: float) -> Measurement:
    server = psutil.Process(pid)
    out = Measurement()
    ends: list[float] = []
    start = time.perf_counter() + warmup
    tasks = [
        asyncio.create_task(_caller(path, (start, start + duration), out, ends))
        for _ in range(conns)
    ]
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    cpu0, own0 = server.cpu_times(), time.process_time()
    await asyncio.gather(*tasks)
    cpu1, own1 = server.cpu_times(), time.process_time()
    out.elapsed = (max(ends) if ends else time.perf_counter()) - start
    out.server_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    out.client_cpu = own1 - own0
    return out


def run(opts: Options) -> Report:
    """Measure and report."""
    rounds, duration, warmup = (1, 1.0, 0.3) if opts.quick else (3, 3.0, 0.5)
    report = Report("rpc")
    results: dict[tuple[str, int], list[Measurement]] = {}
    echo_dir = opts.workdir / "echo"
    echo_dir.mkdir(parents=True, exist_ok=True)
    echo_sock = echo_dir / "echo.sock"
    proto_sock = echo_dir / "echo-protocol.sock"
    echo_py = str(Path(__file__).with_name("echo_server.py"))
    with (
        DaemonProcess(opts.workdir / "daemon") as daemon,
        NotifiedProcess([sys.executable, echo_py, str(echo_sock)], echo_dir, "echo") as echo,
        NotifiedProcess(
            [sys.executable, echo_py, str(proto_sock), "--protocol"], echo_dir, "echo-protocol"
        ) as proto,
    ):
        targets = {
            "daemon": (daemon.socket_path, daemon.pid),
            "echo": (echo_sock, echo.pid),
            PROTO: (proto_sock, proto.pid),
        }
        audit_before = daemon.audit_lines()
        for r in range(rounds):
            names = ["echo", "daemon", PROTO]
            order = names[r % 3 :] + names[: r % 3]
            for conns in CONCURRENCY:
                for name in order:
                    path, pid = targets[name]
                    m = asyncio.run(_measure(path, pid, conns, warmup, duration))
                    results.setdefault((name, conns), []).append(m)
        # Every call made (warm-up included) should have left one audit line.
        time.sleep(0.2)
        audit_lines = daemon.audit_lines() - audit_before
        daemon_calls = sum(m.calls for (n, _), ms in results.items() if n == "daemon" for m in ms)

    table = Table(
        f"rpc: system.status vs raw JSON echo, {rounds} round(s) x {duration:.0f} s per cell "
        f"after {warmup} s warm-up (load avg {loadavg()})",
        [
            "server",
            "conns",
            "calls",
            "p50 us",
            "p99 us",
            "calls/s p50",
            "server CPU us/call",
            "client CPU %",
        ],
    )
    for conns in CONCURRENCY:
        for name in ("echo", PROTO, "daemon"):
            ms = results[(name, conns)]
            lat = [x for m in ms for x in m.latencies]
            table.add(
                name,
                conns,
                sum(m.calls for m in ms),
                percentile(lat, 50) * 1e6,
                percentile(lat, 99) * 1e6,
                median([m.calls_per_s for m in ms]),
                median([m.server_cpu / m.calls * 1e6 for m in ms if m.calls]),
                median([m.client_cpu / m.elapsed * 100 for m in ms if m.elapsed]),
            )
    report.tables.append(table)

    stricter = []
    for conns in CONCURRENCY:
        d, e, pr = results[("daemon", conns)], results[("echo", conns)], results[(PROTO, conns)]
        d50 = percentile([x for m in d for x in m.latencies], 50)
        p50 = ratio(d50, percentile([x for m in e for x in m.latencies], 50))
        cps = ratio(median([m.calls_per_s for m in e]), median([m.calls_per_s for m in d]))
        report.goals.append(
            Goal(f"rpc p50 latency daemon/echo, {conns} conn(s)", p50, "<= 3", p50 <= 3)
        )
        report.goals.append(
            Goal(f"rpc calls/s echo/daemon, {conns} conn(s)", cps, "<= 3", cps <= 3)
        )
        cpu = [median([m.server_cpu / m.calls for m in ms if m.calls]) for ms in (d, e, pr)]
        cps_pr = ratio(median([m.calls_per_s for m in pr]), median([m.calls_per_s for m in d]))
        stricter.append(
            f"{conns} conn(s): p50 daemon/echo (Protocol) "
            f"{ratio(d50, percentile([x for m in pr for x in m.latencies], 50)):.2f}, "
            f"calls/s echo (Protocol)/daemon "
            f"{cps_pr:.2f}, "
            f"server CPU per call daemon/echo {ratio(cpu[0], cpu[1]):.2f}, "
            f"daemon/echo (Protocol) {ratio(cpu[0], cpu[2]):.2f}"
        )
    report.notes.append(
        "the goal's baseline is 'echo' (asyncio streams); 'echo (Protocol)' answers inside "
        "data_received like the daemon's socket layer, a stricter reference without a goal: "
        + "; ".join(stricter)
    )
    report.notes += [
        "daemon stderr (log + one audit line per call, log_level=info) goes to a file: "
        f"its cost is included; {audit_lines} audit lines were written for "
        f"{daemon_calls} measured daemon calls (+ warm-up calls)",
        "latency = client write -> reply line parsed; the client is one asyncio process; "
        "client CPU % near 100 means the client, not the server, limits calls/s",
    ]
    return report

"""Scenario ``dbus``: D-Bus round trips and token signals.

Round trip: ``Status`` on aiosd (``org.aiosd.Daemon1``: GLib thread → asyncio kernel →
dispatch → reply from the future's callback) vs a raw pydbus service answering the same
shape at once (bench/dbus_echo.py), same private bus, same client (one pydbus connection,
sequential calls), rounds alternating.  Token signals: a 256-token greedy generation followed
over D-Bus (``StartChat``, ``Token`` signals) vs over the socket (``stream`` notifications).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pydbus

from bench.bus import PrivateBus
from bench.common import PROMPT, Goal, Options, Report, Table, loadavg, median, percentile, ratio
from bench.procs import DaemonProcess, NotifiedProcess


def _calls(proxy: object, n: int) -> tuple[list[float], float]:
    lat = []
    t0 = time.perf_counter()
    for _ in range(n):
        s = time.perf_counter()
        proxy.Status()  # type: ignore[attr-defined]
        lat.append(time.perf_counter() - s)
    return lat, n / (time.perf_counter() - t0)


def run(opts: Options) -> Report:
    """Measure and report."""
    from aiosd.sdk import Client
    from aiosd.sdk.dbus import BusClient

    rounds, n = (2, 300) if opts.quick else (4, 2000)
    report = Report("dbus")
    lat: dict[str, list[float]] = {"daemon": [], "echo": []}
    cps: dict[str, list[float]] = {"daemon": [], "echo": []}
    with PrivateBus(opts.workdir / "bus") as bus:
        echo_argv = [sys.executable, str(Path(__file__).with_name("dbus_echo.py")), bus.address]
        with (
            DaemonProcess(opts.workdir / "daemon", slots=1, threads=1, dbus=bus.address) as d,
            NotifiedProcess(echo_argv, opts.workdir / "echo", "dbus-echo"),
        ):
            con = pydbus.connect(bus.address)
            proxies = {
                "daemon": con.get("org.aiosd.Daemon1", "/org/aiosd/Daemon1")[
                    "org.aiosd.Daemon1.System"
                ],
                "echo": con.get("org.aiosd.BenchEcho", "/org/aiosd/BenchEcho"),
            }
            for name in proxies:
                _calls(proxies[name], 50)  # warm-up
            for r in range(rounds):
                for name in ("echo", "daemon") if r % 2 == 0 else ("daemon", "echo"):
                    lats, c = _calls(proxies[name], n)
                    lat[name] += lats
                    cps[name].append(c)

            params = {
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": 256,
                "stream": True,
            }
            streams = Table(
                "token delivery: one 256-token greedy generation per row",
                ["transport", "tokens received", "completion tokens", "tokens/s at client"],
            )
            speeds: dict[str, list[float]] = {"dbus": [], "socket": []}
            for _ in range(1 if opts.quick else 3):
                for transport in ("dbus", "socket"):
                    client = (
                        BusClient(bus.address) if transport == "dbus" else Client(d.socket_path)
                    )
                    with client:
                        t0 = time.perf_counter()
                        got = sum(1 for _ in client.stream("llm.chat", dict(params)))
                        elapsed = time.perf_counter() - t0
                        done = client.last_result["usage"]["completion_tokens"]
                    speeds[transport].append(got / elapsed)
                    streams.add(transport, got, done, got / elapsed)
    table = Table(
        f"D-Bus Status round trips: {rounds} rounds x {n} calls, one connection "
        f"(load avg {loadavg()})",
        ["service", "p50 us", "p99 us", "calls/s (median of rounds)"],
    )
    for name in ("echo", "daemon"):
        table.add(
            name,
            percentile(lat[name], 50) * 1e6,
            percentile(lat[name], 99) * 1e6,
            median(cps[name]),
        )
    report.tables += [table, streams]
    p50 = ratio(percentile(lat["daemon"], 50), percentile(lat["echo"], 50))
    report.goals.append(Goal("D-Bus Status p50 daemon/echo", p50, "<= 1.5", p50 <= 1.5))
    report.notes.append(
        "token signals per second are bounded by generation speed; the ratio dbus/socket "
        f"of median tokens/s is {ratio(median(speeds['dbus']), median(speeds['socket'])):.3f}"
    )
    return report

"""Scenario ``idle``: start-to-READY time and idle memory of the daemon with its default model.

The daemon runs its built-in model config (SmolLM2, 2 slots, threads = cpu_count // 2,
n_ctx 2048) twice over: with its default D-Bus front-end (on a private dbus-daemon, as this
machine has no system bus) and with ``[dbus] enabled = false``.  Baselines, started and
measured the same way in the same run (``bench/idle_baseline.py``): a bare Python process that
only loads the same model the same way (2 contexts) and sends READY=1, and a bare Python
interpreter that just sends READY=1.  Starts alternate between the four; one warm-up start of
each is not counted.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from bench.bus import PrivateBus
from bench.common import Options, Report, Table, loadavg, median
from bench.procs import DaemonProcess, NotifiedProcess

MIB = 1024 * 1024


@dataclass(frozen=True)
class Sample:
    """One start of one process."""

    ready_s: float
    rss: int
    uss: int
    pss: int
    threads: int


def _sample(proc: NotifiedProcess, idle: float) -> Sample:
    with proc:
        time.sleep(idle)
        info = psutil.Process(proc.pid).memory_full_info()
        threads = psutil.Process(proc.pid).num_threads()
    return Sample(proc.start_to_ready, info.rss, info.uss, info.pss, threads)


def run(opts: Options) -> Report:
    """Measure and report."""
    from aiosd.kernel.llm.llamacpp import default_model_path

    starts, idle = (2, 1.5) if opts.quick else (5, 3.0)
    model = str(default_model_path())
    script = str(Path(__file__).with_name("idle_baseline.py"))
    bus = PrivateBus(opts.workdir / "bus")
    kinds: dict[str, tuple[str, Callable[[Path], NotifiedProcess]]] = {
        "dbus": (
            "daemon, default config (2 slots, D-Bus front-end)",
            lambda d: DaemonProcess(d, dbus=bus.address),
        ),
        "daemon": ("daemon, default config, D-Bus disabled", lambda d: DaemonProcess(d)),
        "model": (
            "baseline: python + same model, 2 contexts",
            lambda d: NotifiedProcess([sys.executable, script, "2", model], d, "baseline-model"),
        ),
        "bare": (
            "baseline: bare python interpreter",
            lambda d: NotifiedProcess([sys.executable, script, "0"], d, "baseline-bare"),
        ),
    }
    samples: dict[str, list[Sample]] = {k: [] for k in kinds}
    with bus:
        for i in range(starts + 1):
            for key, (_, make) in kinds.items():
                sample = _sample(make(opts.workdir / f"{key}-{i}"), idle)
                if i > 0:  # the first start of each is a warm-up
                    samples[key].append(sample)

    report = Report("idle")
    table = Table(
        f"idle: {starts} starts each after 1 warm-up start, memory read after {idle} s idle "
        f"(load avg {loadavg()})",
        [
            "process",
            "start->READY p50 ms",
            "min ms",
            "max ms",
            "RSS p50 MiB",
            "USS p50 MiB",
            "PSS p50 MiB",
            "threads",
        ],
    )
    for key, ss in samples.items():
        ready = [s.ready_s * 1000 for s in ss]
        table.add(
            kinds[key][0],
            median(ready),
            min(ready),
            max(ready),
            median([s.rss / MIB for s in ss]),
            median([s.uss / MIB for s in ss]),
            median([s.pss / MIB for s in ss]),
            ss[-1].threads,
        )
    report.tables.append(table)

    base = samples["model"]
    for key in ("dbus", "daemon"):
        ss = samples[key]
        extra_ms = (median([s.ready_s for s in ss]) - median([s.ready_s for s in base])) * 1000
        extra_rss = (median([s.rss for s in ss]) - median([s.rss for s in base])) / MIB
        report.notes.append(
            f"{kinds[key][0]} minus the model-only baseline (p50s): {extra_ms:+.1f} ms to "
            f"READY, {extra_rss:+.1f} MiB RSS"
        )
    report.notes += [
        "start->READY: Popen returned -> READY=1 datagram received on our NOTIFY_SOCKET; the "
        "daemon sends it after loading the model and a self-check call on its socket",
        "RSS counts the mmapped GGUF pages touched (shared with the page cache); USS is memory "
        "private to the process; PSS splits shared pages among their users",
        "per-start daemon start->READY ms, with D-Bus: "
        + ", ".join(f"{s.ready_s * 1000:.0f}" for s in samples["dbus"])
        + "; without: "
        + ", ".join(f"{s.ready_s * 1000:.0f}" for s in samples["daemon"]),
    ]
    return report

"""Scenario ``omp``: why a daemon with 2-thread slots drops to about a third of its speed.

llama-cpp-python's wheel is built with OpenMP (libgomp).  Every thread that drives a
multi-threaded llama.cpp context becomes the master of its own OpenMP team, and the team's
helper threads stay alive with their master.  When libgomp manages more threads than there
are CPUs it throttles its barrier spin-wait to ~100 iterations and sleeps on futexes
instead, which makes each token's many barriers slow.

Part 1 (direct, in this process): one context generating on the main thread alone, then on
a second thread, then on the main thread while the second thread (and so its team) is alive,
then on the main thread after the second thread has exited.  Part 2 (daemon, 1 slot x 2
threads): serial requests, a burst of overlapping requests, serial requests again; for each,
tokens/s and which daemon threads did the computing.  The daemon runs prepare() and the
generation on one shared ThreadPoolExecutor (slots + 1 workers), so a slot's generations
hop between worker threads — each hop onto a new thread creates another OpenMP team.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import psutil  # type: ignore[import-untyped]

from bench.chat import timed_chat
from bench.common import MAX_TOKENS, PROMPT, Options, Report, Table, loadavg, median
from bench.direct import DirectModel, Generation
from bench.procs import DaemonProcess


def _direct(reps: int) -> Table:
    model = DirectModel(threads=2)
    table = Table(
        f"omp part 1: direct llama-cpp-python, 1 context x 2 threads, {reps} runs per row, "
        "in this order",
        ["generating thread", "runs", "tok/s p50", "min", "max"],
    )
    rows: list[tuple[str, list[float]]] = []

    def runs(label: str, generate: Callable[[], Generation]) -> None:
        rows.append((label, [generate().tokens_per_s for _ in range(reps)]))

    def here() -> Generation:
        return model.generate(PROMPT, MAX_TOKENS)

    try:
        here()  # warm-up; this thread's OpenMP team now exists
        runs("main thread, the only OpenMP team", here)
        with ThreadPoolExecutor(max_workers=1) as pool:
            runs("second thread, while main's team exists", lambda: pool.submit(here).result())
            runs("main thread, while the second thread's team exists", here)
        # The pool's thread has exited: libgomp freed its team.
        runs("main thread, after the second thread exited", here)
    finally:
        model.close()
    for label, tps in rows:
        table.add(label, len(tps), median(tps), min(tps), max(tps))
    return table


class _ThreadWatch:
    """Which of the daemon's threads burnt CPU since the last look (labelled T1, T2, ...)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.labels: dict[int, str] = {}
        self.last = self._times()

    def _times(self) -> dict[int, float]:
        return {t.id: t.user_time + t.system_time for t in self.proc.threads()}

    def busy(self) -> str:
        """Threads that used more than 0.3 s of CPU since the previous call."""
        now = self._times()
        busy = [tid for tid, cpu in now.items() if cpu - self.last.get(tid, 0.0) > 0.3]
        self.last = now
        for tid in busy:
            self.labels.setdefault(tid, f"T{len(self.labels) + 1}")
        return "+".join(sorted(self.labels[t] for t in busy)) + f" (of {len(now)} threads)"


def _daemon(opts: Options, serial: int) -> Table:
    table = Table(
        "omp part 2: daemon, 1 slot x 2 threads, one row per request in order",
        ["phase", "tok/s (queue wait included)", "threads that computed"],
    )
    with DaemonProcess(opts.workdir / "daemon", slots=1, threads=2) as daemon:
        watch = _ThreadWatch(daemon.pid)

        def one(phase: str) -> None:
            gen = asyncio.run(timed_chat(daemon.socket_path, PROMPT, MAX_TOKENS))
            table.add(phase, gen.tokens_per_s, watch.busy())

        async def burst(n: int) -> list[float]:
            gens = await asyncio.gather(
                *(timed_chat(daemon.socket_path, PROMPT, MAX_TOKENS) for _ in range(n))
            )
            return [g.tokens_per_s for g in gens]

        for _ in range(serial):
            one("serial")
        tps = asyncio.run(burst(3))
        table.add("3 overlapping", ", ".join(f"{x:.1f}" for x in tps), watch.busy())
        for _ in range(serial):
            one("serial, after the overlap")
    return table


def run(opts: Options) -> Report:
    """Measure and report."""
    report = Report("omp")
    report.tables.append(_direct(opts.reps(3, 1)))
    report.tables.append(_daemon(opts, opts.reps(6, 3)))
    report.notes += [
        f"load avg at end: {loadavg()}",
        "a generating thread and its OpenMP helper show up as a pair of busy threads; with "
        "one thread per slot, the same pair should compute every request",
    ]
    return report

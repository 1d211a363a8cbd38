"""Scenario ``scale``: aggregate tokens/s with 1, 2 and 4 concurrent requests.

Each request is a 128-token greedy ``llm.chat`` (non-streaming, one connection per request,
distinct prompts), against the daemon with 1 slot x 2 threads and with 2 slots x 1 thread.
Aggregate tokens/s = all completion tokens / (first request sent -> last answer received).
Baselines measured in the same run: llama-cpp-python directly with 1 context x 2 threads
(sequential generations) and with 2 contexts x 1 thread (two generations at once, in two
Python threads).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.chat import timed_chat
from bench.common import MAX_TOKENS, PROMPTS, Options, Report, Table, loadavg, median, ratio
from bench.direct import DirectModel, Generation
from bench.procs import DaemonProcess

CONCURRENCY = (1, 2, 4)
LAYOUTS = ((1, 2), (2, 1))  # (slots, threads per slot): 2 cores either way


@dataclass(frozen=True)
class Batch:
    """Requests run at once, and how long they took together."""

    tokens: int
    wall: float
    latencies: tuple[float, ...]

    @property
    def tokens_per_s(self) -> float:
        """Aggregate completion tokens per second."""
        return self.tokens / self.wall


def _direct(contexts: int, threads: int, reps: int) -> list[Batch]:
    """All four prompts, ``contexts`` at a time: context 0 on this thread, others on threads.

    Context 0 runs on the calling (main) thread on purpose: with llama.cpp's OpenMP build a
    second thread driving a multi-threaded context is much slower (see scenario ``omp``).
    """
    models = [DirectModel(threads=threads) for _ in range(contexts)]

    def share(i: int) -> list[Generation]:
        return [models[i].generate(p, MAX_TOKENS) for p in PROMPTS[i::contexts]]

    try:
        with ThreadPoolExecutor(max_workers=max(1, contexts - 1)) as pool:

            def one_round() -> Batch:
                t0 = time.perf_counter()
                others = [pool.submit(share, i) for i in range(1, contexts)]
                gens = share(0) + [g for f in others for g in f.result()]
                wall = time.perf_counter() - t0
                return Batch(sum(g.tokens for g in gens), wall, tuple(g.total for g in gens))

            one_round()  # warm-up
            return [one_round() for _ in range(reps)]
    finally:
        for model in models:
            model.close()


async def _daemon_batch(path: Path, concurrency: int) -> Batch:
    t0 = time.perf_counter()
    gens = await asyncio.gather(
        *(
            timed_chat(path, PROMPTS[i % len(PROMPTS)], MAX_TOKENS, stream=False)
            for i in range(concurrency)
        )
    )
    wall = time.perf_counter() - t0
    return Batch(sum(g.tokens for g in gens), wall, tuple(g.total for g in gens))


def run(opts: Options) -> Report:
    """Measure and report."""
    reps = opts.reps(3, 1)
    report = Report("scale")
    direct = {(1, 2): _direct(1, 2, reps), (2, 1): _direct(2, 1, reps)}
    table = Table(
        f"scale: aggregate tokens/s, {MAX_TOKENS}-token greedy requests, {reps} repetition(s) "
        f"after a warm-up (load avg at end: see below)",
        [
            "setup",
            "concurrent",
            "requests",
            "tokens",
            "aggregate tok/s p50",
            "min",
            "max",
            "request latency p50 ms",
            "vs direct same layout",
        ],
    )
    for (contexts, threads), batches in direct.items():
        table.add(
            f"direct llama-cpp-python, {contexts} context(s) x {threads} thread(s)",
            contexts,
            len(batches[0].latencies),
            batches[0].tokens,
            median([b.tokens_per_s for b in batches]),
            min(b.tokens_per_s for b in batches),
            max(b.tokens_per_s for b in batches),
            median([x * 1000 for b in batches for x in b.latencies]),
            "1.00 (baseline)",
        )
    for slots, threads in LAYOUTS:
        base = median([b.tokens_per_s for b in direct[(slots, threads)]])
        with DaemonProcess(opts.workdir / f"slots{slots}", slots=slots, threads=threads) as d:
            asyncio.run(_daemon_batch(d.socket_path, 2 * slots))  # warm-up every slot
            for conc in CONCURRENCY:
                batches = [asyncio.run(_daemon_batch(d.socket_path, conc)) for _ in range(reps)]
                tps = [b.tokens_per_s for b in batches]
                table.add(
                    f"daemon, {slots} slot(s) x {threads} thread(s)",
                    conc,
                    conc,
                    batches[0].tokens,
                    median(tps),
                    min(tps),
                    max(tps),
                    median([x * 1000 for b in batches for x in b.latencies]),
                    ratio(median(tps), base),
                )
    report.tables.append(table)
    report.notes += [
        f"load avg at end: {loadavg()}",
        "direct rows run all 4 prompts per repetition (sequentially on 1 context, or 2 at a "
        "time on 2 contexts); 'tokens' is the total of one repetition",
        "'vs direct same layout' = daemon aggregate / direct aggregate with the same "
        "contexts x threads; a 2-slot daemon with 1 request uses only one 1-thread context",
        "requests are non-streaming (stream=false); prompts: the 4 prompts of bench/common.py "
        "in turn",
    ]
    return report

"""Scenario ``llm``: one 128-token greedy generation, direct llama-cpp-python vs the daemon.

Both sides use the same GGUF, n_ctx and threads (1 slot, threads=2).  The direct side runs
``Llama.generate`` on the chat-formatted tokens in this process; the daemon side streams
``llm.chat`` over the socket and is timed at the client.  Repetitions alternate between the
two (order flipped every repetition) so that machine noise hits both alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from bench.chat import DaemonGeneration, timed_chat
from bench.common import MAX_TOKENS, PROMPT, Goal, Options, Report, Table, loadavg, median, ratio
from bench.direct import DirectModel, Generation
from bench.procs import DaemonProcess

THREADS = 2


class Timed(Protocol):
    """What both kinds of generation have in common."""

    @property
    def tokens(self) -> int: ...
    @property
    def ttft(self) -> float: ...
    @property
    def total(self) -> float: ...
    @property
    def tokens_per_s(self) -> float: ...


def _row(table: Table, name: str, runs: Sequence[Timed]) -> None:
    counts = sorted(r.tokens for r in runs)
    tps = [r.tokens_per_s for r in runs]
    ttft = [r.ttft * 1000 for r in runs]
    table.add(
        name,
        len(runs),
        f"{counts[0]}-{counts[-1]}",
        median(tps),
        min(tps),
        max(tps),
        median(ttft),
        max(ttft),
        median([r.total * 1000 for r in runs]),
    )


def run(opts: Options) -> Report:
    """Measure and report."""
    reps = opts.reps(5, 2)
    report = Report("llm")
    direct_runs: list[Generation] = []
    daemon_runs: list[DaemonGeneration] = []
    model = DirectModel(threads=THREADS)
    try:
        with DaemonProcess(opts.workdir / "llm", slots=1, threads=THREADS) as daemon:

            def via_daemon() -> DaemonGeneration:
                return asyncio.run(timed_chat(daemon.socket_path, PROMPT, MAX_TOKENS))

            def direct() -> Generation:
                return model.generate(PROMPT, MAX_TOKENS)

            warm_direct, warm_daemon = direct(), via_daemon()  # warm-up: caches, page faults
            for i in range(reps):
                if i % 2 == 0:
                    direct_runs.append(direct())
                    daemon_runs.append(via_daemon())
                else:
                    daemon_runs.append(via_daemon())
                    direct_runs.append(direct())
    finally:
        model.close()

    table = Table(
        f"llm: {MAX_TOKENS}-token greedy generation, 1 slot, threads={THREADS}, "
        f"{reps} repetitions after 1 warm-up each (load avg {loadavg()})",
        [
            "path",
            "reps",
            "tokens",
            "tok/s p50",
            "tok/s min",
            "tok/s max",
            "TTFT p50 ms",
            "TTFT max ms",
            "total p50 ms",
        ],
    )
    _row(table, "direct llama-cpp-python (Llama.generate)", direct_runs)
    _row(table, "daemon (llm.chat stream=true, socket)", daemon_runs)
    report.tables.append(table)

    tps_ratio = ratio(
        median([r.tokens_per_s for r in daemon_runs]), median([r.tokens_per_s for r in direct_runs])
    )
    added_ttft = median([r.ttft for r in daemon_runs]) - median([r.ttft for r in direct_runs])
    added_ttft_ms = added_ttft * 1000
    report.goals.append(
        Goal("llm tokens/s ratio daemon/direct", tps_ratio, ">= 0.95", tps_ratio >= 0.95)
    )
    report.goals.append(
        Goal("llm added TTFT p50 (ms)", added_ttft_ms, "<= 20 ms", added_ttft_ms <= 20)
    )

    texts = {r.text for r in direct_runs} | {r.text for r in daemon_runs}
    same = len(texts) == 1
    server_ttft = [r.server_ttft_ms for r in daemon_runs if r.server_ttft_ms is not None]
    report.notes += [
        f"prompt: {PROMPT!r}; max_tokens={MAX_TOKENS}, temperature=0; warm-up runs produced "
        f"{warm_direct.tokens} (direct) and {warm_daemon.tokens} (daemon) tokens",
        "tok/s = completion tokens / (request start -> last token), TTFT included; the direct "
        "clock starts before chat formatting + tokenizing "
        f"(p50 {median([r.prep for r in direct_runs]) * 1000:.2f} ms of its TTFT)",
        "the same prompt is repeated, so in both paths llama.cpp reuses the cached prompt "
        "prefix: TTFT is mostly one decode step, not a full prompt evaluation",
        f"daemon-side timings.first_token_ms p50: {median(server_ttft):.2f} ms "
        f"(from after prepare() to the first token, as the daemon measures it)",
        f"stream notifications per daemon request: {sorted({r.notes for r in daemon_runs})}",
        "tok/s of each repetition, direct: "
        + ", ".join(f"{r.tokens_per_s:.1f}" for r in direct_runs)
        + "; daemon: "
        + ", ".join(f"{r.tokens_per_s:.1f}" for r in daemon_runs),
        f"daemon text identical to direct text (greedy): {'yes' if same else 'NO'}",
    ]
    return report

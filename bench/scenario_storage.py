"""Scenario ``storage``: puts/s and gets/s through the socket; search latency at 10k and 100k.

Baseline, measured in the same run: the very same operations on the same storage code
(``UserStore``) called directly in this process — SQLite's own cost, without the daemon,
the socket and JSON-RPC.  Search runs on stores prefilled with 10,000 and 100,000 entries of
generated text (Zipf-distributed words, so common words hit many entries).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.common import Goal, Options, Report, Table, loadavg, median, percentile, ratio
from bench.procs import DaemonProcess

CLIENTS = (1, 16)
VALUE = "x" * 200
VOCAB = [f"w{i}" for i in range(3000)]


def _text(rng: random.Random, words: int = 24) -> str:
    # Zipf-like: low word numbers are common, high ones rare.
    return " ".join(
        VOCAB[min(int(rng.paretovariate(1.1)) - 1, len(VOCAB) - 1)] for _ in range(words)
    )


async def _client(
    path: Path, n: int, ops: Sequence[tuple[str, Mapping[str, object]]], lat: list[float]
) -> None:
    reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 22)
    try:
        for i, (method, params) in enumerate(ops):
            t0 = time.perf_counter()
            writer.write(
                json.dumps({"jsonrpc": "2.0", "id": i, "method": method, "params": params}).encode()
                + b"\n"
            )
            await writer.drain()
            msg = json.loads(await reader.readline())
            if "result" not in msg:
                raise RuntimeError(f"{method} failed: {msg}")
            lat.append(time.perf_counter() - t0)
    finally:
        writer.close()


def _through_daemon(
    path: Path, per_client: Sequence[Sequence[tuple[str, Mapping[str, object]]]]
) -> tuple[float, list[float]]:
    lat: list[float] = []

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(path, i, ops, lat) for i, ops in enumerate(per_client)))
        return time.perf_counter() - t0

    return asyncio.run(main()), lat


def _direct_store(directory: Path) -> object:
    from aiosd.managers.storage import Limits, UserStore

    store = UserStore(directory / "direct.sqlite", 0, "normal", Limits(1 << 40, 1 << 30, 20))
    store.open()
    return store


def _prefill(db_dir: Path, entries: int, seed: int) -> None:
    """Fill uid 0's store (the daemon's file) with ``entries`` generated texts."""
    from aiosd.managers.storage import Limits, UserStore

    db_dir.mkdir(parents=True, exist_ok=True)
    store = UserStore(db_dir / "0.sqlite", 0, "normal", Limits(1 << 40, 1 << 30, 20))
    store.open()
    rng = random.Random(seed)
    assert store.db is not None
    store.db.execute("PRAGMA synchronous = OFF")  # prefilling only; the runs use the default
    for i in range(entries):
        store.put("docs", f"d{i:06}", _text(rng).encode(), True, {"n": i % 10})
    store.close()


def run(opts: Options) -> Report:
    """Measure and report."""
    report = Report("storage")
    n_ops = 400 if opts.quick else 2000
    table = Table(
        f"storage: puts and gets of {len(VALUE)}-byte values, {n_ops} per client "
        f"(load avg {loadavg()})",
        ["path", "op", "clients", "ops/s", "p50 us", "p99 us"],
    )
    with DaemonProcess(opts.workdir / "ops") as daemon:
        for clients in CLIENTS:
            puts = [
                [
                    ("storage.put", {"collection": "bench", "key": f"c{c}-{i}", "value": VALUE})
                    for i in range(n_ops)
                ]
                for c in range(clients)
            ]
            gets = [
                [("storage.get", {"collection": "bench", "key": f"c{c}-{i}"}) for i in range(n_ops)]
                for c in range(clients)
            ]
            for op, work in (("put", puts), ("get", gets)):
                elapsed, lat = _through_daemon(daemon.socket_path, work)
                table.add(
                    "daemon",
                    op,
                    clients,
                    clients * n_ops / elapsed,
                    percentile(lat, 50) * 1e6,
                    percentile(lat, 99) * 1e6,
                )
    store = _direct_store(opts.workdir)
    for op in ("put", "get"):
        lat = []
        t0 = time.perf_counter()
        for i in range(n_ops):
            s0 = time.perf_counter()
            if op == "put":
                store.put("bench", f"k{i}", VALUE.encode(), True, {})  # type: ignore[attr-defined]
            else:
                store.get("bench", f"k{i}", None)  # type: ignore[attr-defined]
            lat.append(time.perf_counter() - s0)
        elapsed = time.perf_counter() - t0
        table.add(
            "direct UserStore",
            op,
            1,
            n_ops / elapsed,
            percentile(lat, 50) * 1e6,
            percentile(lat, 99) * 1e6,
        )
    store.close()  # type: ignore[attr-defined]
    report.tables.append(table)

    sizes = (10_000, 100_000)
    queries = 60 if opts.quick else 300
    search = Table(
        f"storage.search: {queries} queries of 1-2 words, limit 20 (load avg {loadavg()})",
        ["entries", "path", "p50 ms", "p95 ms", "median hits"],
    )
    for entries in sizes:
        directory = opts.workdir / f"search{entries}"
        t0 = time.perf_counter()
        _prefill(directory / "state" / "storage", entries, seed=entries)
        report.notes.append(f"prefilling {entries} entries took {time.perf_counter() - t0:.1f} s")
        rng = random.Random(7)
        qs = [
            " ".join(rng.choice(VOCAB[:400]) for _ in range(rng.choice((1, 2))))
            for _ in range(queries)
        ]
        with DaemonProcess(directory) as daemon:
            ops = [
                [("storage.search", {"query": q, "collection": "docs", "limit": 20}) for q in qs]
            ]
            _through_daemon(daemon.socket_path, [ops[0][:10]])  # warm the page cache
            _, lat = _through_daemon(daemon.socket_path, ops)
        from aiosd.managers.storage import Limits, UserStore

        direct = UserStore(
            directory / "state" / "storage" / "0.sqlite", 0, "normal", Limits(1 << 40, 1 << 30, 20)
        )
        direct.open()
        dlat, hits = [], []
        for q in qs:
            s0 = time.perf_counter()
            hits.append(len(direct.search(q, ["docs"], {}, 20, 0)))
            dlat.append(time.perf_counter() - s0)
        direct.close()
        search.add(
            entries,
            "daemon (socket)",
            percentile(lat, 50) * 1e3,
            percentile(lat, 95) * 1e3,
            median(hits),
        )
        search.add(
            entries,
            "direct UserStore",
            percentile(dlat, 50) * 1e3,
            percentile(dlat, 95) * 1e3,
            median(hits),
        )
        if entries == 100_000:
            p95 = percentile(lat, 95) * 1e3
            report.goals.append(
                Goal("storage.search p95 at 100k entries (ms)", p95, "<= 20", p95 <= 20)
            )
            report.notes.append(
                "search overhead of the daemon path at 100k (p50 daemon/direct): "
                f"{ratio(percentile(lat, 50), percentile(dlat, 50)):.2f}x"
            )
    report.tables.append(search)
    report.notes.append(
        f"python {sys.version.split()[0]}; durability normal (WAL, "
        "synchronous=NORMAL); every put commits before its reply"
    )
    return report

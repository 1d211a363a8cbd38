"""Run aiosd's benchmarks and print a table of figures per scenario.

    .venv/bin/python bench/run.py [--quick] [--commit REV] [--json FILE] [scenario ...]

Scenarios: llm, rpc, idle, scale, omp, dbus, storage, fuzz, rss, hostile, agents (default:
all, in that order).  Every scenario compares the daemon with a baseline measured in the same
run; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, SOURCE_ENV, CpuWatch, Options, Report, loadavg  # noqa: E402

NAMES = (
    "llm",
    "rpc",
    "idle",
    "scale",
    "omp",
    "dbus",
    "storage",
    "fuzz",
    "rss",
    "hostile",
    "agents",
    "tools",
)


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _snapshot(rev: str, workdir: Path) -> str:
    """Extract ``aiosd/`` as committed at ``rev`` and measure that instead of the work tree.

    Must run before anything imports ``aiosd``: the daemon, and this process, import the
    snapshot first (it precedes the editable install on sys.path).
    """
    sha = _git("rev-parse", "--short", f"{rev}^{{commit}}")
    src = workdir / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", sha, "aiosd"], cwd=REPO, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    os.environ[SOURCE_ENV] = str(src)
    sys.path.insert(0, str(src))
    return f"commit {sha} (git archive of aiosd/, work tree not used)"


def _work_tree() -> str:
    try:
        dirty = _git("status", "--porcelain", "--", "aiosd")
        head = _git("rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        return "work tree (no git information)"
    return f"work tree at {head}{' + uncommitted changes in aiosd/' if dirty else ''}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _terminate(signum: int, frame: object) -> None:
    # Turn SIGTERM into an exception so that every started process is stopped on the way out.
    raise SystemExit(128 + signum)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and shorter runs")
    ap.add_argument(
        "--commit",
        metavar="REV",
        help="measure aiosd/ as committed at REV instead of the (possibly changing) work tree",
    )
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the reports as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (daemon logs)")
    ap.add_argument("scenario", nargs="*", help=f"any of: {', '.join(NAMES)} (default: all)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.scenario if n not in NAMES]
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the scenarios, print their reports."""
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="aiosd-bench-"))
    reports: list[Report] = []
    try:
        source = _snapshot(args.commit, workdir) if args.commit else _work_tree()
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        print(f"aiosd benchmarks — {now}")
        print(
            f"machine: {_cpu_model()}, {os.cpu_count()} CPUs; python {platform.python_version()}"
            f"; load avg {loadavg()}; mode: {'quick' if args.quick else 'full'}"
        )
        print(f"aiosd source: {source}", flush=True)
        for name in args.scenario or NAMES:
            run: Callable[[Options], Report] = importlib.import_module(f"bench.scenario_{name}").run
            t0, cpu = time.monotonic(), CpuWatch()
            report = run(Options(quick=args.quick, workdir=workdir / name))
            report.notes.append(f"scenario took {time.monotonic() - t0:.1f} s")
            report.notes.append(cpu.summary())
            reports.append(report)
            print()
            print(report.render(), flush=True)
    finally:
        if args.keep:
            print(f"\nwork directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in reports], indent=2))
    missed = [g.name for r in reports for g in r.goals if not g.met]
    print(f"\ngoals missed: {', '.join(missed) if missed else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

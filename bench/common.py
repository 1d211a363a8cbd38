"""Shared pieces of the benchmarks: options, prompts, statistics, tables and goals."""

from __future__ import annotations

import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where the daemon's ``aiosd`` package is imported from (set by ``run.py --commit``).
SOURCE_ENV = "AIOSD_BENCH_SOURCE"


def source_dir() -> Path:
    """The directory holding the ``aiosd`` package under test: the repo, or a snapshot."""
    return Path(os.environ.get(SOURCE_ENV) or REPO)


N_CTX = 2048
MAX_TOKENS = 128

# Each of these makes SmolLM2-135M-Instruct write well over 128 tokens at temperature 0
# (checked: ≥400 tokens each), so a 128-token generation always stops on max_tokens.
PROMPTS: tuple[str, ...] = (
    "Write a long story about a lighthouse keeper who finds a mysterious map.",
    "Write a long story about a robot who learns to paint.",
    "Write a long story about two children who build a raft and sail down a river.",
    "Write a long story about a baker in a small mountain village.",
)
PROMPT = PROMPTS[0]


@dataclass(frozen=True)
class Options:
    """What the command line asked for."""

    quick: bool
    workdir: Path

    def reps(self, full: int, quick: int) -> int:
        """Repetitions for this run."""
        return quick if self.quick else full


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = q / 100 * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    """The median, NaN when empty."""
    return statistics.median(values) if values else math.nan


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0."""
    return a / b if b else math.nan


def loadavg() -> str:
    """The 1/5/15-minute load averages, to show how busy the machine was."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _machine_cpu() -> tuple[float, float, float]:
    """Seconds of CPU since boot, all CPUs together: (busy, steal, total)."""
    ticks = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    busy = user + nice + system + irq + softirq
    return busy / ticks, steal / ticks, (busy + idle + iowait + steal) / ticks


def _own_cpu() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuWatch:
    """How much CPU other processes used while a scenario ran (the machine is shared)."""

    def __init__(self) -> None:
        self._machine = _machine_cpu()
        self._own = _own_cpu()

    def summary(self) -> str:
        """One line, to be read once every child of the scenario has been stopped."""
        busy, steal, total = (b - a for a, b in zip(self._machine, _machine_cpu(), strict=True))
        own = _own_cpu() - self._own
        cpus = os.cpu_count() or 1
        return (
            f"machine CPU while it ran: benchmark processes {own / total * cpus * 100:.0f}%, "
            f"other processes {max(0.0, busy - own) / total * cpus * 100:.0f}%, "
            f"hypervisor steal {steal / total * cpus * 100:.0f}% (100% = one CPU; "
            f"{cpus} CPUs)"
        )


def fmt(value: object) -> str:
    """A table cell: floats with 3 significant decimals where it matters."""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


@dataclass
class Table:
    """Rows of figures with a title and column headers."""

    title: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: object) -> None:
        """Append one row."""
        self.rows.append([fmt(c) for c in cells])

    def render(self) -> str:
        """The table as aligned text (also valid Markdown)."""
        widths = [len(h) for h in self.headers]
        for row in self.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        body = [line(r) for r in self.rows]
        return "\n".join([f"{self.title}", "", line(self.headers), sep, *body])


@dataclass(frozen=True)
class Goal:
    """One target and whether this run met it."""

    name: str
    measured: float
    target: str
    met: bool

    def render(self) -> str:
        """One line: name, measured value, target, verdict."""
        verdict = "MET" if self.met else "MISSED"
        return f"goal {self.name}: {fmt(self.measured)} (target {self.target}) -> {verdict}"


@dataclass
class Report:
    """What one scenario measured."""

    scenario: str
    tables: list[Table] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        """Tables, goals and notes as text."""
        parts = [f"== {self.scenario} =="]
        parts += [t.render() + "\n" for t in self.tables]
        parts += [g.render() for g in self.goals]
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

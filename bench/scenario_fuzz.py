"""Scenario ``fuzz``: 100,000 hostile frames per transport from an unprivileged member.

The same generators and checks as the suite's fuzzers (bench/fuzz.py, bench/fuzz_dbus.py),
run long: every outcome counted (ok, and each error), every broken promise listed (internal
errors, missing or extra replies, dropped connections, tracebacks in replies), the daemon's log
searched for errors and tracebacks, and its VmRSS read before and after each transport.  The
baseline in the same run is the daemon itself before the first frame (RSS at start).
"""

from __future__ import annotations

import os
from collections import Counter

from bench.common import Goal, Options, Report, Table
from bench.fuzz import Failure, Plan, SocketFuzzer, Tally, cases
from bench.fuzz_env import USER_GROUP, setting
from bench.peer import Dialer, log_problems, rss

SEED = int(os.environ.get("AIOSD_FUZZ_SEED", "90210"))


def _distinct(failures: list[Failure]) -> list[tuple[str, int]]:
    """Failures grouped by what went wrong and the call (without its values)."""
    groups: Counter[str] = Counter()
    for f in failures:
        groups[f"{f.what}: {f.case.split('(')[0].split('=')[0][:90]} -> {f.detail[:120]}"] += 1
    return groups.most_common()


def run(opts: Options) -> Report:
    """Measure and report."""
    from bench import fuzz_dbus

    frames = opts.reps(100_000, 5_000)
    report = Report("fuzz")
    tallies: dict[str, Tally] = {}
    memory: dict[str, tuple[int, int]] = {}
    with setting(opts.workdir) as s:
        pid = s.daemon.pid
        start = rss(pid)["VmRSS"]
        dial = Dialer(s.member, s.socket_path)
        fuzzer = SocketFuzzer(dial)
        try:
            fuzzer.run(cases(Plan(seed=SEED, count=frames, share_group=USER_GROUP)))
        finally:
            fuzzer.close()
            dial.close()
        tallies["socket"] = fuzzer.tally
        memory["socket"] = (start, rss(pid)["VmRSS"])

        bus_dial = fuzz_dbus.BusDialer(s.member, s.bus_socket)
        other = fuzz_dbus.BusDialer(s.other, s.bus_socket)
        try:
            con = bus_dial()
            owner = fuzz_dbus.name_owner(con)
            theirs = other()
            targets = fuzz_dbus.Targets(others=[fuzz_dbus.start_chat(theirs)])
            bus_fuzzer = fuzz_dbus.BusFuzzer(bus_dial, targets)
            bus_fuzzer.con = con
            before = rss(pid)["VmRSS"]
            xml = fuzz_dbus.introspect(con)
            bus_fuzzer.run(fuzz_dbus.bus_cases(SEED, frames, xml, targets))
            owner_after = fuzz_dbus.name_owner(theirs)
        finally:
            bus_dial.close()
            other.close()
        tallies["dbus"] = bus_fuzzer.tally
        memory["dbus"] = (before, rss(pid)["VmRSS"])
        problems = log_problems(s.log.read_text(errors="replace"))

    summary = Table(
        f"{frames} frames per transport, seed {SEED}, as a member user",
        ["transport", "calls", "replies", "ok", "internal errors", "failures", "seconds",
         "VmRSS start MiB", "VmRSS end MiB"],
    )  # fmt: skip
    outcomes = Table("outcomes per transport", ["transport", "outcome", "count"])
    for name, t in tallies.items():
        internal = t.internal_errors() + t.outcomes[fuzz_dbus.INTERNAL]
        a, b = memory[name]
        summary.add(name, t.sent, t.replies, t.outcomes["ok"], internal, len(t.failures),
                    t.seconds, a / 2**20, b / 2**20)  # fmt: skip
        for outcome, count in sorted(t.outcomes.items()):
            outcomes.add(name, outcome, count)
    report.tables += [summary, outcomes]
    failures = Table("distinct failures", ["transport", "count", "failure"])
    for name, t in tallies.items():
        for text, count in _distinct(t.failures)[:30]:
            failures.add(name, count, text)
    if failures.rows:
        report.tables.append(failures)
    logged = Table("errors and tracebacks in the daemon log", ["count", "record"])
    for text, count in Counter(problems).most_common(30):
        logged.add(count, text[:300])
    if logged.rows:
        report.tables.append(logged)
    for name, t in tallies.items():
        internal = t.internal_errors() + t.outcomes[fuzz_dbus.INTERNAL]
        report.goals.append(Goal(f"{name} internal errors", internal, "0", internal == 0))
        report.goals.append(Goal(f"{name} failures", len(t.failures), "0", not t.failures))
    report.goals.append(Goal("daemon log errors/tracebacks", len(problems), "0", not problems))
    report.goals.append(Goal("D-Bus name kept by the same connection", float(owner == owner_after),
                             "1", owner == owner_after))  # fmt: skip
    return report

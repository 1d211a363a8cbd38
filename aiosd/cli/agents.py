"""``aiosctl agent …``: start, list, follow and end agents (the ``agent.*`` syscalls).

The verbs read like ps, systemctl and docker: ``run`` (foreground by default: the agent's
output is followed and aiosctl exits with its status), ``ps``, ``info``, ``logs``,
``stop``, ``kill``, ``suspend``, ``resume``, ``wait`` and ``available``.  Parsing and
formatting are plain functions of their inputs (tests/unit/test_cli.py).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from aiosd.cli.data import UsageError, print_json
from aiosd.cli.exits import EXIT_FAILURE, EXIT_OK, EXIT_TEMPFAIL, status_of
from aiosd.errors import AiosError, NotFound
from aiosd.kernel.families.agent import SIGNALS
from aiosd.kernel.scheduler import Priority
from aiosd.sdk.client import Client, SyscallClient

#: The most lines ``agent.logs`` gives (its ``tail`` bound).
MAX_TAIL = 100_000
#: Lines ``aiosctl agent logs`` shows by default (the daemon's default tail).
DEFAULT_TAIL = 100

_AID = re.compile(r"^[0-9a-f]{12}$")
_AID_PREFIX = re.compile(r"^[0-9a-f]{1,11}$")
_SIZE = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([kmgtpe]?)(?:i?b)?$", re.I)
_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)$", re.I)
_UNITS = "KMGTPE"

BUS_FOLLOW = (
    "--bus cannot follow an agent's output yet: over D-Bus a line of output does not say "
    "whether the agent wrote it to standard output or standard error. Use the socket "
    "(leave out --bus)"
)


# --- parsing of arguments (argparse types: errors are usage errors, exit status 2) ----------


def parse_size(text: str) -> int:
    """Bytes from ``512M``, ``1G``, ``1.5G``, ``4096`` (K, M, G, T … are powers of 1024;
    a trailing ``B`` or ``iB`` is allowed)."""
    m = _SIZE.match(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give bytes, or a number with K, M, G or T (512M, 1G)"
        )
    number, unit = m.groups()
    factor = 1024 ** (_UNITS.index(unit.upper()) + 1) if unit else 1
    return int(float(number) * factor)


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``1.5``, ``90s``, ``5m``, ``2h`` or ``1d``."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: give seconds, or a number with s, m, h or d (90, 5m)"
        )
    number, unit = m.groups()
    return float(number) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit.lower()]


def parse_signal(text: str) -> str:
    """A signal agent.kill takes: a name (TERM, SIGTERM, term) or a number (15)."""
    name = text.strip().upper().removeprefix("SIG")
    if name.isdigit():
        try:
            name = signal.Signals(int(name)).name.removeprefix("SIG")
        except ValueError:
            name = text
    if name not in SIGNALS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(SIGNALS)}")
    return name


def parse_aid(text: str) -> str:
    """An AID (12 hex digits) or a prefix of one; checked before connecting."""
    aid = text.strip().lower()
    if not (_AID.match(aid) or _AID_PREFIX.match(aid)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an agent id: an AID is 12 hex digits (or the start of one), "
            "as 'aiosctl agent ps -a' shows"
        )
    return aid


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value


def _weight(text: str) -> int:
    value = _non_negative(text)
    if not 1 <= value <= 10000:
        raise argparse.ArgumentTypeError(f"{text!r} is not from 1 to 10000")
    return value


def _seconds(text: str) -> float:
    return parse_duration(text)


def parse_env(items: Sequence[str], environ: Any = None) -> dict[str, str]:
    """``--env`` values: ``KEY=VALUE``, or ``KEY`` alone for the value aiosctl has."""
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key:
            raise UsageError(f"--env: {item!r} is not KEY=VALUE")
        if not eq:
            if key not in environ:
                raise UsageError(f"--env: {key} is not set here; give {key}=VALUE")
            value = environ[key]
        env[key] = value
    return env


def _owner(value: str) -> int | str:
    return int(value) if value.isdigit() else value


def spawn_params(args: argparse.Namespace, cwd: str | None = None) -> dict[str, Any]:
    """``agent.spawn`` params from ``aiosctl agent run``'s arguments (UsageError if they do
    not make one); a relative ``--cwd`` is taken from ``cwd`` (default: aiosctl's own)."""
    argv = list(args.argv or [])
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if args.name is None and not argv:
        raise UsageError(
            "give the agent to run: --name NAME (an installed agent: 'aiosctl agent "
            "available'), or a command line after --"
        )
    params: dict[str, Any]
    if args.name is not None:
        # What follows an installed agent's name are its arguments.
        params = {"name": args.name, "args": argv} if argv else {"name": args.name}
    else:
        params = {"argv": argv}
    if args.cwd is not None:
        params["cwd"] = os.path.normpath(os.path.join(cwd or os.getcwd(), args.cwd))
    if args.env:
        params["env"] = parse_env(args.env)
    limits = {
        key: getattr(args, key)
        for key in ("memory_max", "tasks_max", "runtime_max", "cpu_weight")
        if getattr(args, key) is not None
    }
    if limits:
        params["limits"] = limits
    for key in ("priority", "label", "memory_budget"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.tools is not None:
        params["tools"] = args.tools
    if args.user is not None:
        params["user"] = _owner(args.user)
    return params


# --- formatting -----------------------------------------------------------------------------


def human_size(n: int) -> str:
    """``512B``, ``1.5K``, ``512M``, ``12G`` (powers of 1024, as ``--memory-max`` reads them)."""
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        if value < 1023.95 or unit == _UNITS[-1]:
            return f"{value:.1f}{unit}" if value < 9.95 else f"{value:.0f}{unit}"
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    """``42s``, ``3m12s``, ``25m``, ``2h5m``, ``14h``, ``3d4h``, ``12d`` (as kubectl shows ages)."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 10:
        return f"{m}m{s}s" if s else f"{m}m"
    if m < 60:
        return f"{m}m"
    h, m = divmod(m, 60)
    if h < 10:
        return f"{h}h{m}m" if m else f"{h}h"
    if h < 24:
        return f"{h}h"
    d, h = divmod(h, 24)
    return f"{d}d{h}h" if d < 10 and h else f"{d}d"


def local_time(t: float | None) -> str:
    """A Unix time as a local ISO 8601 date with the UTC offset; ``-`` for None."""
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def _signal_number(name: str) -> int | None:
    if name.isdigit():
        return int(name)
    try:
        return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    except KeyError:
        return None


def exit_status(a: dict[str, Any]) -> int:
    """The status a shell would give for an ended agent: its exit code, 128 + the signal
    that killed it, or 1 when it has neither (it could not start, or was lost)."""
    if a.get("signal"):
        number = _signal_number(str(a["signal"]))
        return 128 + number if number is not None else EXIT_FAILURE
    code = a.get("exit_code")
    if isinstance(code, int) and 0 <= code <= 255:
        return code
    return EXIT_FAILURE


def state_of(a: dict[str, Any]) -> str:
    """The STATE column: the state, and for an ended agent its status (``exited(3)``)."""
    if a["state"] == "exited" and a.get("exit_code") is not None:
        return f"exited({a['exit_code']})"
    if a["state"] == "killed" and a.get("signal"):
        return f"killed({str(a['signal']).removeprefix('SIG')})"
    return str(a["state"])


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    """Columns two spaces apart, as wide as their widest cell; ``right``: the columns aligned
    right; the last column is not padded."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = []
        for i, cell in enumerate(r):
            if i == len(r) - 1:
                cells.append(str(cell))
            elif i in right:
                cells.append(str(cell).rjust(widths[i]))
            else:
                cells.append(str(cell).ljust(widths[i]))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


PS_HEADER = ("AID", "USER", "STATE", "PID", "CPU", "RSS", "TOKENS", "AGE", "LABEL")


def format_ps(agents: Sequence[dict[str, Any]], now: float) -> str:
    """``aiosctl agent ps``: one agent per line, under a header."""
    rows = []
    for a in agents:
        live = a["state"] in ("running", "suspended", "stopping")
        rows.append(
            (
                a["aid"],
                a["user"],
                state_of(a),
                str(a["pid"]) if live and a["pid"] is not None else "-",
                f"{a['cpu_s']:.2f}",
                human_size(a["rss"]) if live else "-",
                f"{a['tokens_in']}/{a['tokens_out']}",
                human_duration(now - a["started"]),
                a["label"],
            )
        )
    return table(PS_HEADER, rows, right={3, 4, 5})


def _limit(value: float, show: Callable[[Any], str]) -> str:
    return show(value) if value else "none"


def format_info(a: dict[str, Any], now: float) -> str:
    """``aiosctl agent info``: the agent as ``Key: value`` lines."""
    lim = a["limits"]
    ended = a.get("ended")
    status = "-"
    if ended is not None:
        status = str(exit_status(a))
        if a.get("signal"):
            status += f" (killed by {a['signal']})"
        elif a.get("exit_code") is None:
            status += " (no exit code)"
    tools = a.get("tools")
    fields: list[tuple[str, str]] = [
        ("AID", a["aid"]),
        ("Label", a["label"]),
        ("Installed agent", a.get("name") or "-"),
        ("User", f"{a['user']} (uid {a['uid']})"),
        ("State", a["state"]),
        ("Reason", a.get("reason") or "-"),
        ("Exit status", status),
        ("PID", str(a["pid"]) if a.get("pid") is not None else "-"),
        ("Command", shlex.join(a["argv"])),
        ("Directory", a["cwd"]),
        ("Started", local_time(a["started"])),
        ("Ended", local_time(ended)),
        ("Run time", human_duration((ended if ended is not None else now) - a["started"])),
        ("Priority", a["priority"]),
        ("Backend", a["backend"]),
        ("Memory space", a["memory_space"]),
        ("Memory budget", _limit(a["memory_budget"], human_size)),
        ("Tools", "any" if tools is None else (", ".join(tools) or "none")),
        ("Memory limit", _limit(lim["memory_max"], human_size)),
        ("Tasks limit", _limit(lim["tasks_max"], str)),
        ("Runtime limit", _limit(lim["runtime_max"], human_duration)),
        ("CPU weight", str(lim["cpu_weight"])),
        ("CPU time", f"{a['cpu_s']:.2f}s"),
        ("Memory", f"{human_size(a['rss'])} (peak {human_size(a['max_rss'])})"),
        ("Tasks", str(a["tasks"])),
        ("Tokens", f"{a['tokens_in']} in, {a['tokens_out']} out"),
        ("Syscalls", str(a["syscalls"])),
    ]
    width = max(len(k) for k, _ in fields) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in fields)


def format_available(agents: Sequence[dict[str, Any]]) -> str:
    """``aiosctl agent available``: name, source and description of each installed agent."""
    rows = [(m["name"], m["source"], m.get("description") or "") for m in agents]
    return table(("NAME", "SOURCE", "DESCRIPTION"), rows, right=set())


def format_line(line: dict[str, Any], timestamps: bool) -> str:
    """One line of output as printed (``--timestamps``: after its local time)."""
    if not timestamps:
        return str(line["text"])
    stamp = datetime.datetime.fromtimestamp(line["time"]).astimezone()
    return f"{stamp.isoformat(timespec='milliseconds')} {line['text']}"


# --- the command line -----------------------------------------------------------------------


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``aiosctl agent`` and its verbs."""
    ag = sub.add_parser(
        "agent", parents=[common], help="start, list, follow and stop agents (processes)"
    )
    av = ag.add_subparsers(dest="agent_command", metavar="VERB", required=True)

    run = av.add_parser(
        "run",
        parents=[common],
        help="start an agent; follow its output and exit with its status",
        usage="aiosctl agent run [options] (--name NAME [--] [ARG ...] | [--] PROGRAM [ARG ...])",
        description="Start an agent: an installed one (--name, the ARGs added to its own "
        "command line) or the command line after --. "
        "In the foreground (the default) its output is followed and aiosctl exits with the "
        "agent's exit status (128+N if signal N killed it); Ctrl-C stops it.",
    )
    run.add_argument("-d", "--detach", action="store_true", help="print the AID and return at once")
    run.add_argument(
        "--name",
        help="an installed agent (see 'aiosctl agent available'); what follows are its arguments",
    )
    run.add_argument("--cwd", metavar="DIR", help="working directory (default: the owner's home)")
    run.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable (repeatable; KEY alone passes aiosctl's value)",
    )
    run.add_argument(
        "--memory-max", type=parse_size, metavar="SIZE", help="memory limit: bytes, 512M, 1G"
    )
    run.add_argument("--tasks-max", type=_non_negative, metavar="N", help="processes and threads")
    run.add_argument(
        "--runtime-max",
        type=_seconds,
        metavar="SECONDS",
        help="wall-clock limit, then it is stopped (90, 5m, 2h)",
    )
    run.add_argument(
        "--cpu-weight", type=_weight, metavar="N", help="CPU share, 1 to 10000 (100: as others)"
    )
    run.add_argument(
        "--priority", choices=[p.value for p in Priority], help="scheduling class of its LLM calls"
    )
    run.add_argument("--label", help="a short name shown by 'agent ps' (default: the program's)")
    run.add_argument(
        "--memory-budget", type=parse_size, metavar="SIZE", help="its short-term memory budget"
    )
    run.add_argument(
        "--tool",
        action="append",
        dest="tools",
        metavar="TOOL",
        help="a tool it may use (repeatable; default: the installed agent's, or any)",
    )
    run.add_argument("--user", help="the owner, for administrators: a user name or uid")
    run.add_argument(
        "argv",
        nargs=argparse.REMAINDER,
        metavar="-- ARGV",
        help="the program and its arguments",
    )
    run.set_defaults(func=agent_run, check=check_run)

    ps = av.add_parser("ps", parents=[common], help="list agents (live ones; -a: ended too)")
    ps.add_argument("-a", "--all", action="store_true", help="include the agents that ended")
    ps.set_defaults(func=agent_ps)

    many = argparse.ArgumentParser(add_help=False)
    many.add_argument("aids", nargs="+", type=parse_aid, metavar="AID")

    st = av.add_parser("stop", parents=[common, many], help="stop agents: SIGTERM, then SIGKILL")
    st.add_argument(
        "-t",
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="grace period before SIGKILL (default: the daemon's agents.stop_timeout)",
    )
    st.set_defaults(func=_acts("agent.stop", "timeout"))
    ki = av.add_parser("kill", parents=[common, many], help="send a signal to agents")
    ki.add_argument(
        "-s",
        "--signal",
        type=parse_signal,
        default="KILL",
        metavar="SIGNAL",
        help=f"the signal (default KILL; one of {', '.join(SIGNALS)})",
    )
    ki.set_defaults(func=_acts("agent.kill", "signal"))
    su = av.add_parser("suspend", parents=[common, many], help="freeze agents")
    su.set_defaults(func=_acts("agent.suspend"))
    re_ = av.add_parser("resume", parents=[common, many], help="thaw frozen agents")
    re_.set_defaults(func=_acts("agent.resume"))
    inf = av.add_parser("info", parents=[common, many], help="show agents in full")
    inf.set_defaults(func=agent_info)
    wa = av.add_parser(
        "wait", parents=[common, many], help="wait until agents end; exit with their status"
    )
    wa.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="wait at most this long")
    wa.set_defaults(func=agent_wait)

    lo = av.add_parser("logs", parents=[common], help="show an agent's output (-f: follow it)")
    lo.add_argument("aid", type=parse_aid, metavar="AID")
    lo.add_argument(
        "-n",
        "--tail",
        type=_non_negative,
        default=DEFAULT_TAIL,
        metavar="N",
        help=f"the last N lines (default {DEFAULT_TAIL})",
    )
    lo.add_argument(
        "-f", "--follow", action="store_true", help="then print new lines until the agent ends"
    )
    lo.add_argument(
        "-t", "--timestamps", action="store_true", help="put each line's local time first"
    )
    lo.set_defaults(func=agent_logs, check=check_logs)

    ava = av.add_parser("available", parents=[common], help="list the installed agents")
    ava.set_defaults(func=agent_available)


def check_run(args: argparse.Namespace) -> None:
    """``agent run``'s arguments, before connecting: ``args.spawn`` holds the params."""
    if not args.detach and getattr(args, "json", False):
        raise UsageError("--json with agent run needs --detach (the agent's output is printed)")
    if not args.detach and getattr(args, "bus", False):
        raise UsageError(f"{BUS_FOLLOW}, or start the agent with --detach")
    args.spawn = spawn_params(args)


def check_logs(args: argparse.Namespace) -> None:
    """``agent logs``'s arguments, before connecting."""
    if args.follow and getattr(args, "bus", False):
        raise UsageError(f"{BUS_FOLLOW}, or leave out --follow")


# --- the verbs ------------------------------------------------------------------------------


def resolve(client: SyscallClient, aid: str) -> str:
    """The AID that ``aid`` (a whole AID, or a unique prefix of one) names."""
    if _AID.match(aid):
        return aid
    found: list[str] = [a["aid"] for a in client.call("agent.list", {"ended": True})["agents"]]
    matches = [a for a in found if a.startswith(aid)]
    if not matches:
        raise NotFound(f"no agent {aid!r}")
    if len(matches) > 1:
        raise UsageError(f"{aid!r} is the start of several AIDs: {', '.join(matches)}")
    return matches[0]


def _each(
    client: SyscallClient,
    args: argparse.Namespace,
    act: Callable[[str], Any],
    show: Callable[[Any], int],
) -> int:
    """Do ``act`` for every AID of the command line and ``show`` its result (which prints it
    unless --json, and gives a status); an error is reported and the other AIDs go on.  With
    --json the results are printed at the end: one object, or a list for several AIDs.
    The status: the first that was not 0."""
    status = EXIT_OK
    results = []
    for text in args.aids:
        try:
            result = act(resolve(client, text))
        except AiosError as exc:
            print(f"aiosctl: {exc.message}", file=sys.stderr)
            status = status or status_of(exc)
            continue
        results.append(result)
        shown = show(result)
        status = status or shown
    if args.json and results:
        print_json(results[0] if len(args.aids) == 1 else results)
    return status


def _acts(method: str, *names: str) -> Callable[[SyscallClient, argparse.Namespace], int]:
    """A verb that makes ``method`` for each AID, with the options ``names`` that were given,
    and prints each AID done."""

    def run(client: SyscallClient, args: argparse.Namespace) -> int:
        extra = {n: getattr(args, n) for n in names if getattr(args, n) is not None}

        def show(a: dict[str, Any]) -> int:
            if not args.json:
                print(a["aid"])
            return EXIT_OK

        return _each(client, args, lambda aid: client.call(method, {"aid": aid, **extra}), show)

    return run


def agent_ps(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl agent ps."""
    result = client.call("agent.list", {"ended": args.all})
    if args.json:
        print_json(result)
    else:
        print(format_ps(result["agents"], time.time()))
    return EXIT_OK


def agent_info(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl agent info."""
    shown: list[str] = []

    def show(a: dict[str, Any]) -> int:
        if not args.json:
            if shown:
                print()
            print(format_info(a, time.time()))
            shown.append(a["aid"])
        return EXIT_OK

    return _each(client, args, lambda aid: client.call("agent.info", {"aid": aid}), show)


def _say_end(a: dict[str, Any], status: int) -> None:
    if status:
        print(f"aiosctl: agent {a['aid']}: {a.get('reason') or a['state']}", file=sys.stderr)


def agent_wait(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl agent wait: print each agent's exit status; exit with the first that is not 0."""
    extra = {"timeout": args.timeout} if args.timeout is not None else {}

    def show(a: dict[str, Any]) -> int:
        if not a["ended_in_time"]:
            print(
                f"aiosctl: agent {a['aid']} is still {a['state']} after {args.timeout:g} s",
                file=sys.stderr,
            )
            return EXIT_TEMPFAIL
        status = exit_status(a)
        if not args.json:
            print(status)
            _say_end(a, status)
        return status

    def act(aid: str) -> Any:
        return client.call("agent.wait", {"aid": aid, **extra})

    return _each(client, args, act, show)


def agent_available(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl agent available."""
    result = client.call("agent.available")
    if args.json:
        print_json(result)
        return EXIT_OK
    if result["agents"]:
        print(format_available(result["agents"]))
    else:
        print("aiosctl: no installed agents", file=sys.stderr)
    for problem in result.get("problems") or []:
        print(f"aiosctl: {problem}", file=sys.stderr)
    return EXIT_OK


def _print_line(line: dict[str, Any], timestamps: bool) -> None:
    out = sys.stderr if line.get("stream") == "stderr" else sys.stdout
    out.write(format_line(line, timestamps) + "\n")
    out.flush()


def follow(client: SyscallClient, aid: str, tail: int, timestamps: bool = False) -> None:
    """Print the agent's last ``tail`` lines, then every new line until it has ended.

    One ``agent.logs`` call with stream=true: the daemon sends the kept lines, then the new
    ones, as notifications, each line once and in order.
    """
    for note in client.stream("agent.logs", {"aid": aid, "tail": tail, "stream": True}):
        if note.get("dropped"):
            print(
                f"aiosctl: {note['dropped']} lines of agent {aid}'s output were dropped "
                "(printing did not keep up)",
                file=sys.stderr,
            )
            continue
        line = {
            "time": note.get("time", 0.0),
            "stream": note.get("stream"),
            "text": note["content"],
        }
        _print_line(line, timestamps)


def agent_logs(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl agent logs."""
    aid = resolve(client, args.aid)
    if args.json:
        params = {"aid": aid, "tail": args.tail, "stream": args.follow}
        if args.follow:
            for note in client.stream("agent.logs", params):
                print_json(note)
            print_json(client.last_result)
        else:
            print_json(client.call("agent.logs", params))
        return EXIT_OK
    if args.follow:
        follow(client, aid, args.tail, args.timestamps)
        return EXIT_OK
    for line in client.call("agent.logs", {"aid": aid, "tail": args.tail})["lines"]:
        _print_line(line, args.timestamps)
    return EXIT_OK


class Interrupted(Exception):
    """A signal asked aiosctl to end while it ran an agent in the foreground."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """SIGINT, SIGTERM and SIGHUP while an agent runs in the foreground: held back until
    :meth:`arm` (so that a Ctrl-C during the spawn still stops the agent), then raised as
    :class:`Interrupted` once; a second one while the agent stops leaves at once."""

    CAUGHT = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.armed = False
        self.pending: int | None = None
        self.old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in self.CAUGHT:
            self.old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self.old.items():
            signal.signal(sig, old)

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.armed:
            self.armed = False
            raise Interrupted(signum)
        if self.pending is not None:
            raise KeyboardInterrupt  # a second signal: leave now
        self.pending = signum

    def arm(self) -> None:
        if self.pending is not None:
            raise Interrupted(self.pending)
        self.armed = True

    def disarm(self) -> None:
        self.armed = False
        self.pending = self.pending or signal.SIGINT


@contextlib.contextmanager
def _another_client(args: argparse.Namespace) -> Iterator[SyscallClient]:
    """A second connection, for when the first is in the middle of a stream."""
    if getattr(args, "bus", False):
        from aiosd.sdk.dbus import BusClient

        with BusClient() as bus:
            yield bus
        return
    path: Path | None = getattr(args, "socket", None)
    with Client(path) as client:
        yield client


def _stop(args: argparse.Namespace, aid: str, why: str) -> None:
    print(f"aiosctl: {why}: stopping agent {aid}", file=sys.stderr)
    with _another_client(args) as other:
        a = other.call("agent.stop", {"aid": aid})
    print(f"aiosctl: agent {aid}: {a.get('reason') or a['state']}", file=sys.stderr)


def agent_run(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl agent run."""
    if args.detach:
        a = client.call("agent.spawn", args.spawn)
        if args.json:
            print_json(a)
        else:
            print(a["aid"])
        return EXIT_OK
    with _Signals() as signals:
        aid = client.call("agent.spawn", args.spawn)["aid"]
        try:
            signals.arm()
            follow(client, aid, MAX_TAIL)
            done = client.call("agent.wait", {"aid": aid})
        except Interrupted as exc:
            signals.disarm()
            name = signal.Signals(exc.signum).name
            _stop(args, aid, "interrupted" if exc.signum == signal.SIGINT else name)
            return 128 + exc.signum
        except BrokenPipeError:
            signals.disarm()
            # Nobody reads the output any more (agent run … | head): end the agent, as a
            # shell pipeline would with SIGPIPE, and write nothing more to the closed pipe.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            _stop(args, aid, "output closed")
            return 128 + signal.SIGPIPE
    status = exit_status(done)
    _say_end(done, status)
    return status

"""aiosctl without a daemon: clear messages, the documented exit codes, and the parsing and
formatting of `aiosctl agent`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from aiosd.cli import agents
from aiosd.cli.data import UsageError
from aiosd.cli.main import EXIT_CODES, EXIT_UNAVAILABLE, EXIT_USAGE, build_parser, main
from tests.support import REPO


def _aiosctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiosd.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_unreachable_daemon_names_the_socket_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "nothing.sock"
    out = _aiosctl("--socket", str(path), "status")
    assert out.returncode == EXIT_UNAVAILABLE == 69
    assert str(path) in out.stderr
    assert "systemctl start aiosd" in out.stderr
    assert "Traceback" not in out.stderr


def test_socket_option_after_the_command_and_env_default(tmp_path: Path) -> None:
    path = tmp_path / "x.sock"
    out = _aiosctl("models", "--socket", str(path))
    assert out.returncode == EXIT_UNAVAILABLE and str(path) in out.stderr


def test_bad_schema_is_a_usage_error(tmp_path: Path) -> None:
    # Found before connecting: the (absent) daemon plays no part in a usage error.
    out = _aiosctl("--socket", str(tmp_path / "x.sock"), "ask", "--schema", "{not json", "hi")
    assert out.returncode == EXIT_USAGE
    assert "--schema: not valid JSON" in out.stderr
    out = _aiosctl("--socket", str(tmp_path / "x.sock"), "ask", "--schema", "@/nonexistent", "hi")
    assert out.returncode == EXIT_USAGE and "cannot read /nonexistent" in out.stderr
    out = _aiosctl("--socket", str(tmp_path / "x.sock"), "call", "system.status", "[1]")
    assert out.returncode == EXIT_USAGE and "must be a JSON object" in out.stderr


def test_help_lists_every_syscall_and_exit_code() -> None:
    from aiosd.kernel.syscalls import SYSCALLS

    out = _aiosctl("--help")
    assert out.returncode == 0
    for name in SYSCALLS:
        assert name in out.stdout
    for code in ("65", "69", "75", "77"):
        assert f"  {code} " in out.stdout


# --- aiosctl agent: parsing and formatting (no daemon) ----------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _record(**changes: object) -> dict[str, object]:
    a: dict[str, object] = {
        "aid": "f0101693122f",
        "user": "alice",
        "uid": 1000,
        "label": "hello",
        "name": None,
        "argv": ["/bin/sh", "-c", "echo hi; exit 3"],
        "cwd": "/tmp",
        "state": "running",
        "pid": 4242,
        "backend": "subprocess",
        "started": 1_000_000.0,
        "ended": None,
        "exit_code": None,
        "signal": None,
        "reason": "",
        "priority": "normal",
        "memory_space": "agent-f0101693122f",
        "memory_budget": 0,
        "tools": None,
        "limits": {"memory_max": 1 << 30, "tasks_max": 512, "runtime_max": 0.0, "cpu_weight": 100},
        "cpu_s": 1.234,
        "rss": 5 * 1024 * 1024,
        "max_rss": 6 * 1024 * 1024,
        "tasks": 2,
        "tokens_in": 12,
        "tokens_out": 34,
        "syscalls": 5,
    }
    a.update(changes)
    return a


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("512M", 512 << 20), ("1G", 1 << 30), ("1.5g", 3 << 29), ("2KiB", 2048)],
)
def test_sizes_are_read_in_powers_of_1024(text: str, size: int) -> None:
    assert agents.parse_size(text) == size


def test_bad_sizes_durations_signals_and_aids_are_refused() -> None:
    for parse, text in (
        (agents.parse_size, "12Q"),
        (agents.parse_size, "-1"),
        (agents.parse_duration, "soon"),
        (agents.parse_signal, "SEGV"),
        (agents.parse_aid, "not-an-aid"),
        (agents.parse_aid, "0123456789abc"),
    ):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    assert agents.parse_duration("90") == agents.parse_duration("1.5m") == 90.0
    assert agents.parse_duration("2h") == 7200.0
    assert agents.parse_signal("sigterm") == agents.parse_signal("15") == "TERM"
    assert agents.parse_aid("F0101693122F") == "f0101693122f"
    assert agents.parse_aid("f01") == "f01"  # a prefix, resolved against agent.list


def test_run_arguments_make_spawn_params() -> None:
    args = _parse(
        "agent", "run", "--cwd", "work", "-e", "A=1", "--env", "B=x=y", "--memory-max", "512M",
        "--tasks-max", "64", "--runtime-max", "5m", "--cpu-weight", "50", "--priority", "batch",
        "--label", "job", "--tool", "web", "--user", "1001", "--", "/bin/sh", "-c", "exit 3",
    )  # fmt: skip
    assert agents.spawn_params(args, cwd="/home/alice") == {
        "argv": ["/bin/sh", "-c", "exit 3"],
        "cwd": "/home/alice/work",
        "env": {"A": "1", "B": "x=y"},
        "limits": {
            "memory_max": 512 << 20,
            "tasks_max": 64,
            "runtime_max": 300.0,
            "cpu_weight": 50,
        },
        "priority": "batch",
        "label": "job",
        "tools": ["web"],
        "user": 1001,
    }
    # Without --: the words after the program are the program's, options included.
    args = _parse("agent", "run", "--user", "alice", "/bin/ls", "-l", "--json")
    assert agents.spawn_params(args) == {"argv": ["/bin/ls", "-l", "--json"], "user": "alice"}
    assert agents.spawn_params(_parse("agent", "run", "--name", "chat")) == {"name": "chat"}
    # After an installed agent's name: its arguments.
    args = _parse("agent", "run", "--name", "summarize", "--", "notes", "-v")
    assert agents.spawn_params(args) == {"name": "summarize", "args": ["notes", "-v"]}
    with pytest.raises(UsageError):
        agents.spawn_params(_parse("agent", "run"))


def test_env_key_alone_takes_aiosctls_value() -> None:
    assert agents.parse_env(["HOME"], {"HOME": "/root"}) == {"HOME": "/root"}
    with pytest.raises(UsageError, match="not set here"):
        agents.parse_env(["NOPE"], {})
    with pytest.raises(UsageError):
        agents.parse_env(["=x"], {})


def test_verbs_and_their_options_parse() -> None:
    a = _parse("agent", "kill", "-s", "usr1", "f0101693122f", "abc")
    assert (a.signal, a.aids) == ("USR1", ["f0101693122f", "abc"])
    assert _parse("agent", "kill", "f0101693122f").signal == "KILL"
    assert _parse("agent", "stop", "-t", "30", "f0101693122f").timeout == 30.0
    a = _parse("agent", "logs", "-n", "5", "-f", "-t", "f0101693122f")
    assert (a.tail, a.follow, a.timestamps, a.aid) == (5, True, True, "f0101693122f")
    assert _parse("agent", "logs", "f0101693122f").tail == agents.DEFAULT_TAIL
    assert _parse("agent", "ps", "-a").all and not _parse("agent", "ps").all
    assert _parse("agent", "wait", "--timeout", "1m", "f0101693122f").timeout == 60.0
    assert _parse("--json", "agent", "ps").json and _parse("agent", "ps", "--json").json


def test_usage_errors_come_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    nowhere = ["--socket", "/nonexistent/aiosd.sock"]
    assert main([*nowhere, "--bus", "agent", "run", "--", "/bin/true"]) == 2
    assert "--bus cannot follow" in capsys.readouterr().err
    assert main([*nowhere, "--bus", "agent", "logs", "-f", "f0101693122f"]) == 2
    assert "--bus cannot follow" in capsys.readouterr().err
    assert main([*nowhere, "agent", "run", "--json", "--", "/bin/true"]) == 2
    assert "needs --detach" in capsys.readouterr().err
    assert main([*nowhere, "agent", "run"]) == 2
    assert "--name NAME" in capsys.readouterr().err
    # Well formed: then the (absent) daemon is tried.
    assert main([*nowhere, "agent", "run", "-d", "--", "/bin/true"]) == EXIT_UNAVAILABLE
    assert 130 in EXIT_CODES


def test_human_sizes_and_durations() -> None:
    assert [agents.human_size(n) for n in (0, 1023, 1536, 512 << 20, 12 << 30)] == [
        "0B",
        "1023B",
        "1.5K",
        "512M",
        "12G",
    ]
    assert [agents.human_duration(s) for s in (5, 192, 1500, 7500, 50400, 273600, 1e6)] == [
        "5s",
        "3m12s",
        "25m",
        "2h5m",
        "14h",
        "3d4h",
        "11d",
    ]


def test_exit_status_is_what_a_shell_would_say() -> None:
    assert agents.exit_status(_record(state="exited", exit_code=3)) == 3
    assert agents.exit_status(_record(state="killed", signal="SIGKILL")) == 137
    assert agents.exit_status(_record(state="killed", signal="SIGTERM", exit_code=None)) == 143
    assert agents.exit_status(_record(state="lost")) == 1
    assert agents.state_of(_record(state="exited", exit_code=0)) == "exited(0)"
    assert agents.state_of(_record(state="killed", signal="SIGTERM")) == "killed(TERM)"


def test_ps_table() -> None:
    ended = _record(aid="b667af5928c2", state="exited", exit_code=3, rss=0, label="x")
    text = agents.format_ps([_record(), ended], now=1_000_192.0)
    lines = text.splitlines()
    assert lines[0].split() == list(agents.PS_HEADER)
    assert lines[1].split() == [
        "f0101693122f", "alice", "running", "4242", "1.23", "5.0M", "12/34", "3m12s", "hello"
    ]  # fmt: skip
    assert lines[2].split()[2:6] == ["exited(3)", "-", "1.23", "-"]
    assert len({line.index("LABEL") if "LABEL" in line else 0 for line in lines[:1]}) == 1
    assert agents.format_ps([], now=0).split() == list(agents.PS_HEADER)


def test_info_block() -> None:
    a = _record(state="killed", signal="SIGTERM", ended=1_000_065.0, reason="stopped; killed")
    fields = {
        k: v.strip()
        for k, v in (line.split(":", 1) for line in agents.format_info(a, 0).splitlines())
    }
    assert fields["AID"] == "f0101693122f"
    assert fields["User"] == "alice (uid 1000)"
    assert fields["Exit status"] == "143 (killed by SIGTERM)"
    assert fields["Command"] == "/bin/sh -c 'echo hi; exit 3'"
    assert fields["Started"] == agents.local_time(1_000_000.0)
    assert fields["Started"].startswith("1970-01-1")
    assert fields["Run time"] == "1m5s"
    assert (fields["Memory limit"], fields["Runtime limit"]) == ("1.0G", "none")
    assert fields["Memory"] == "5.0M (peak 6.0M)"
    assert fields["Tokens"] == "12 in, 34 out"

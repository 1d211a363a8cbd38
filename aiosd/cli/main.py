"""aiosctl — control and use aiosd from the command line (built on aiosd.sdk)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from aiosd import __version__
from aiosd.cli import agents, data, mcp_serve, tools
from aiosd.cli.data import UsageError
from aiosd.cli.exits import (
    EXIT_CODES,
    EXIT_DATAERR,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_NOPERM,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    status_of,
)
from aiosd.errors import AiosError
from aiosd.kernel.scheduler import Priority
from aiosd.kernel.syscalls import SYSCALLS
from aiosd.paths import DEFAULT_SOCKET
from aiosd.sdk.client import (
    Client,
    DaemonUnreachable,
    SyscallClient,
)

__all__ = [
    "EXIT_CODES",
    "EXIT_DATAERR",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_NOPERM",
    "EXIT_OK",
    "EXIT_TEMPFAIL",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "build_parser",
    "main",
]


def _syscall_help() -> str:
    width = max(len(n) for n in SYSCALLS)
    lines = [f"  {name:<{width}}  {s.summary}" for name, s in SYSCALLS.items()]
    return "syscalls (for 'aiosctl call'):\n" + "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The aiosctl command line (see aiosctl(1))."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--socket",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="PATH",
        help=f"daemon socket (default: $AIOSD_SOCKET, else {DEFAULT_SOCKET})",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON results"
    )
    common.add_argument(
        "--bus",
        action="store_true",
        default=argparse.SUPPRESS,
        help="talk to the daemon over D-Bus (the system bus, or $DBUS_SYSTEM_BUS_ADDRESS) "
        "instead of its socket",
    )
    exits = "\n".join(f"  {code:<3} {text}" for code, text in EXIT_CODES.items())
    ap = argparse.ArgumentParser(
        prog="aiosctl",
        parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Control and use the aiosd LLM agent operating system daemon.",
        epilog=f"{_syscall_help()}\n\nexit status:\n{exits}",
    )
    ap.add_argument("--version", action="version", version=f"aiosctl {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("status", parents=[common], help="show version, uptime, models, queue")
    sub.add_parser("models", parents=[common], help="list the configured models")
    sub.add_parser("queue", parents=[common], help="show running and waiting LLM requests")
    ask = sub.add_parser(
        "ask", parents=[common], help="ask a model; the answer streams token by token"
    )
    ask.add_argument("prompt", nargs="+", help="the question (words are joined by spaces)")
    ask.add_argument("--model", help="configured model name (default: the daemon's default)")
    ask.add_argument("--system", help="a system message to put first")
    ask.add_argument("--max-tokens", type=int, help="upper bound on generated tokens")
    ask.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)")
    ask.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    ask.add_argument(
        "--priority", choices=[p.value for p in Priority], help="scheduling class (default normal)"
    )
    ask.add_argument("--schema", help="JSON schema the answer must follow: inline JSON or @FILE")
    ask.add_argument("--no-stream", action="store_true", help="print the answer when complete")
    ask.add_argument(
        "--tools",
        action="append",
        metavar="TOOL",
        help="let the model use this tool, run as you (a name or a glob such as 'fs.*'; "
        "repeatable; '*': every tool you may use)",
    )
    ask.add_argument(
        "--max-steps", type=int, metavar="N", help="model replies of the tool loop at most (8)"
    )
    call = sub.add_parser("call", parents=[common], help="make any syscall with JSON params")
    call.add_argument("method", choices=list(SYSCALLS), metavar="SYSCALL")
    call.add_argument("params", nargs="?", default="{}", help="JSON object (default {})")
    ask.add_argument("--session", help="keep the conversation under this name (memory)")
    data.add_parsers(sub, common)
    agents.add_parsers(sub, common)
    tools.add_parsers(sub, common)
    mcp_serve.add_parsers(sub, common)
    return ap


def cmd_status(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl status."""
    st = client.call("system.status")
    if args.json:
        data.print_json(st)
        return EXIT_OK
    print(f"aiosd {st['version']} — {st['state']}, pid {st['pid']}, up {st['uptime_s']:.0f}s")
    print(f"models:      {', '.join(st['models'])} (default {st['default_model']})")
    print(f"queue:       {st['running']} running, {st['waiting']} waiting")
    print(f"connections: {st['connections']}")
    print(f"you:         uid {st['caller_uid']}, role {st['caller_role']}")
    return EXIT_OK


def cmd_models(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl models."""
    res = client.call("llm.models")
    if args.json:
        data.print_json(res)
        return EXIT_OK
    print(f"{'NAME':<20} {'BACKEND':<9} {'SLOTS':>5} {'CONTEXT':>8}  DEFAULT")
    for m in res["models"]:
        ctx = m["context_length"] if m["context_length"] is not None else "-"
        print(
            f"{m['name']:<20} {m['backend']:<9} {m['slots']:>5} {ctx:>8}  "
            f"{'yes' if m['default'] else ''}"
        )
    return EXIT_OK


def cmd_queue(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl queue."""
    res = client.call("system.queue")
    if args.json:
        data.print_json(res)
        return EXIT_OK
    for q in res["models"]:
        print(
            f"{q['model']}: {q['running_total']}/{q['slots']} slots busy, "
            f"{q['waiting_total']} waiting, {q['served']} served"
        )
        for r in q["running"]:
            print(
                f"  running  #{r['request_id']:<6} uid {r['uid']:<6} {r['priority']:<11} "
                f"slot {r['slot']}  {r['running_ms']:.0f} ms"
            )
        for w in q["waiting"]:
            print(
                f"  {w['position']:>7}. #{w['request_id']:<6} uid {w['uid']:<6} "
                f"{w['priority']:<11} waited {w['waited_ms']:.0f} ms"
            )
    return EXIT_OK


def cmd_ask(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl ask."""
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": " ".join(args.prompt)})
    params: dict[str, Any] = {
        "messages": messages,
        **data.pick(args, "model", "max_tokens", "temperature", "seed", "priority", "session"),
    }
    if args.schema is not None:
        params["response_schema"] = args.schema
    if args.tools:
        params["use_tools"] = args.tools
        if args.max_steps is not None:
            params["max_steps"] = args.max_steps
    if args.json or args.no_stream:
        result = client.call("llm.chat", params)
        if args.json:
            data.print_json(result)
        else:
            print(result["message"]["content"])
        _notes(result)
        return EXIT_OK
    params["stream"] = True
    for note in client.stream("llm.chat", params):
        if isinstance(note.get("step"), dict):
            print(tools.format_step(note["step"]), file=sys.stderr)
        elif isinstance(note.get("confirm"), dict):
            tools.answer(note["confirm"], args)
        sys.stdout.write(note.get("content", ""))
        sys.stdout.flush()
    sys.stdout.write("\n")
    result = client.last_result
    _notes(result)
    if result and result.get("finish_reason") == "length":
        print("aiosctl: (answer cut at --max-tokens or the model's limit)", file=sys.stderr)
    return EXIT_OK


def _notes(result: Any) -> None:
    for note in (result or {}).get("notes") or []:
        print(f"aiosctl: {note}", file=sys.stderr)


def cmd_call(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl call SYSCALL [JSON]."""
    params = args.params
    if SYSCALLS[args.method].streams and params.get("stream"):
        for note in client.stream(args.method, params):
            print(json.dumps(note, ensure_ascii=False))
        data.print_json(client.last_result)
    else:
        data.print_json(client.call(args.method, params))
    return EXIT_OK


def _client(args: argparse.Namespace, path: Path | None) -> Any:
    if getattr(args, "bus", False):
        from aiosd.sdk.dbus import BusClient

        return BusClient()
    return Client(path)


def _check_input(args: argparse.Namespace) -> None:
    """Parse JSON arguments before connecting: usage errors never depend on the daemon."""
    if args.command == "ask" and args.schema is not None:
        args.schema = data.json_object(args.schema, "--schema", from_file=True)
    if args.command == "ask" and args.max_steps is not None and not args.tools:
        raise UsageError("--max-steps goes with --tools")
    if args.command == "call":
        args.params = data.json_object(args.params, "params", from_file=True)
    check = getattr(args, "check", None)
    if check is not None:
        check(args)


COMMANDS = {
    "status": cmd_status,
    "models": cmd_models,
    "queue": cmd_queue,
    "ask": cmd_ask,
    "call": cmd_call,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``aiosctl`` command."""
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    path = getattr(args, "socket", None)  # None: the client's default_socket()
    try:
        _check_input(args)
        with _client(args, path) as client:
            command = getattr(args, "func", None) or COMMANDS[args.command]
            return int(command(client, args))
    except UsageError as exc:
        print(f"aiosctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DaemonUnreachable as exc:
        print(f"aiosctl: {exc}", file=sys.stderr)
        return status_of(exc)
    except AiosError as exc:
        print(f"aiosctl: {exc.message}", file=sys.stderr)
        return status_of(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # stdout closed early (aiosctl ask ... | head): not an error of ours.
        return EXIT_OK

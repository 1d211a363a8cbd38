"""``aiosctl tool …``: list, describe and call tools; answer and manage confirmations.

``call`` runs one tool as you.  A call that needs your yes shows the tool and its full
arguments and asks ``[y/N/s/a]`` on the terminal (s: for this session of aiosctl's, a:
always); without a terminal it says how to answer (``aiosctl tool confirm ID``) and waits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from aiosd.cli.data import UsageError, print_json
from aiosd.cli.exits import EXIT_FAILURE, EXIT_OK
from aiosd.sdk.client import Client, SyscallClient

ANSWERS = {
    "y": (True, "once"),
    "yes": (True, "once"),
    "s": (True, "session"),
    "session": (True, "session"),
    "a": (True, "always"),
    "always": (True, "always"),
    "n": (False, "once"),
    "no": (False, "once"),
    "": (False, "once"),
}


def parse_arguments(words: list[str], as_json: str | None) -> dict[str, Any]:
    """A tool's arguments from ``KEY=VALUE`` words (a VALUE that is JSON is taken as such:
    numbers, true, null, lists; otherwise as text) or from one JSON object."""
    if as_json is not None:
        if words:
            raise UsageError("give the arguments either as --json-args or as KEY=VALUE, not both")
        try:
            value = json.loads(as_json)
        except ValueError as exc:
            raise UsageError(f"--json-args: not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise UsageError("--json-args: must be a JSON object")
        return value
    out: dict[str, Any] = {}
    for w in words:
        key, eq, raw = w.partition("=")
        if not eq or not key:
            raise UsageError(f"argument {w!r}: write KEY=VALUE (e.g. path=~/notes.txt)")
        if key in out:
            raise UsageError(f"argument {key!r} is given twice")
        try:
            value = json.loads(raw)
            out[key] = value if not isinstance(value, str) else raw
        except ValueError:
            out[key] = raw
    return out


def format_request(p: dict[str, Any]) -> str:
    """A confirmation request, for a person: the tool and every argument, untruncated."""
    kind = "destructive" if p["annotations"].get("destructive") else "changes something"
    who = f" for agent {p['aid']}" if p.get("aid") else ""
    args = json.dumps(p["arguments"], indent=2, ensure_ascii=False)
    return f"aiosd: {p['tool']} ({kind}){who} wants to run with:\n{args}"


def _ask(p: dict[str, Any]) -> tuple[bool, str]:
    """Ask on the controlling terminal (unbuffered: a terminal cannot seek, so no text-mode
    read-write file); Ctrl-D, or a reply that is none of ANSWERS, is no."""
    fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    with os.fdopen(fd, "r+b", buffering=0) as tty:
        prompt = format_request(p) + "\nAllow? [y/N/s(ession)/a(lways)] "
        tty.write(prompt.encode())
        reply = b""
        while not reply.endswith(b"\n"):
            ch = tty.read(1)
            if not ch:
                break
            reply += ch
    return ANSWERS.get(reply.decode(errors="replace").strip().lower(), (False, "once"))


def _interactive() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return sys.stdin.isatty()


def answer(req: dict[str, Any], args: argparse.Namespace) -> None:
    """Answer a confirmation request that arrived on a call's stream: ``--yes``/``--no``,
    else asked on the terminal, else (no terminal) say how to answer it and go on waiting."""
    yes = getattr(args, "yes", None)
    if yes is not None:
        allow, remember = yes, "once"
    elif _interactive():
        allow, remember = _ask(req)
    else:
        print(
            f"{format_request(req)}\naiosctl: waiting for your answer: "
            f"aiosctl tool confirm {req['id']} yes|no",
            file=sys.stderr,
        )
        return
    # Answered on a connection of its own: the call's own waits for the tool.
    with Client(getattr(args, "socket", None)) as other:
        other.call("tool.confirm", {"request": req["id"], "allow": allow, "remember": remember})


def format_step(step: dict[str, Any]) -> str:
    """One step of the tool loop, for stderr: the call and how it went."""
    shown = ", ".join(
        f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in step["arguments"].items()
    )
    how = "ok" if step["ok"] else f"failed: {step['error'].get('message', '')}"
    return f"aiosctl: {step['tool']}({shown}) -> {how}"


def tool_call(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl tool call NAME [KEY=VALUE ...]."""
    params: dict[str, Any] = {"name": args.name, "arguments": args.arguments, "stream": True}
    if args.timeout is not None:
        params["timeout"] = args.timeout
    for note in client.stream("tool.call", params):
        req = note.get("confirm")
        if isinstance(req, dict):
            answer(req, args)
    result = client.last_result
    if args.json:
        print_json(result)
    elif result["ok"]:
        print_json(result["output"])
    else:
        print(f"aiosctl: {result['tool']} failed: {result['error']['message']}", file=sys.stderr)
    return EXIT_OK if result["ok"] else EXIT_FAILURE


def tool_list(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl tool list."""
    listed = client.call("tool.list", {})
    tools = listed["tools"]
    for problem in listed.get("problems") or []:
        print(f"aiosctl: {problem}", file=sys.stderr)
    if args.json:
        print_json(tools)
        return EXIT_OK
    width = max((len(t["name"]) for t in tools), default=4)
    for t in tools:
        a = t["annotations"]
        mark = "asks" if t["needs_confirmation"] else ("read" if a.get("read_only") else "write")
        print(f"{t['name']:<{width}}  {mark:<5} {t['description']}")
    return EXIT_OK


def tool_describe(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl tool describe NAME."""
    print_json(client.call("tool.describe", {"name": args.name}))
    return EXIT_OK


def tool_pending(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl tool pending."""
    reqs = client.call("tool.pending", {})["requests"]
    if args.json:
        print_json(reqs)
    for r in reqs if not args.json else []:
        print(f"{r['id']}  {format_request(r)}")
    return EXIT_OK


def tool_confirm(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl tool confirm ID yes|no [--session|--always]."""
    allow = args.answer in ("yes", "y")
    remember = "always" if args.always else ("session" if args.session else "once")
    out = client.call(
        "tool.confirm", {"request": args.request, "allow": allow, "remember": remember}
    )
    if args.json:
        print_json(out)
    else:
        print(f"{out['tool']}: {'allowed' if allow else 'declined'}" +
              (f" ({remember})" if allow and remember != "once" else ""))  # fmt: skip
    return EXIT_OK


def tool_grants(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl tool grants."""
    out = client.call("tool.grants", {})
    if args.json:
        print_json(out)
    else:
        for name in out["always"]:
            print(f"{name}  always")
    return EXIT_OK


def tool_revoke(client: SyscallClient, args: argparse.Namespace) -> int:
    """aiosctl tool revoke [NAME | --all]."""
    out = client.call("tool.revoke", {"name": args.name} if args.name else {})
    if args.json:
        print_json(out)
    else:
        for name in out["revoked"]:
            print(name)
    return EXIT_OK


def _check_call(args: argparse.Namespace) -> None:
    args.arguments = parse_arguments(args.words, args.json_args)


def _check_revoke(args: argparse.Namespace) -> None:
    if (args.name is None) == (not args.all):
        raise UsageError("name one tool, or give --all")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: between 0 and 3600 seconds")
    return value


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register ``aiosctl tool`` and its verbs."""
    tl = sub.add_parser("tool", parents=[common], help="list and call tools; answer confirmations")
    tv = tl.add_subparsers(dest="tool_command", metavar="VERB", required=True)

    ls = tv.add_parser("list", parents=[common], help="the tools you may use")
    ls.set_defaults(func=tool_list)
    de = tv.add_parser("describe", parents=[common], help="one tool and its arguments' schema")
    de.add_argument("name", metavar="TOOL")
    de.set_defaults(func=tool_describe)

    ca = tv.add_parser(
        "call",
        parents=[common],
        help="run a tool as yourself",
        description="Run a tool as yourself. Arguments are KEY=VALUE words (a VALUE that is "
        "JSON, such as 5, true or [1,2], is taken as such) or one --json-args object. A call "
        "that needs your confirmation asks on the terminal.",
    )
    ca.add_argument("name", metavar="TOOL")
    ca.add_argument("words", nargs="*", metavar="KEY=VALUE")
    ca.add_argument("--json-args", metavar="JSON", help="the arguments as one JSON object")
    ca.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="the most it may take")
    yes = ca.add_mutually_exclusive_group()
    yes.add_argument("-y", "--yes", dest="yes", action="store_const", const=True,
                     help="answer yes to its confirmation request (this call only)")  # fmt: skip
    yes.add_argument("--no", dest="yes", action="store_const", const=False,
                     help="answer no to its confirmation request")  # fmt: skip
    ca.set_defaults(func=tool_call, check=_check_call, yes=None)

    pe = tv.add_parser("pending", parents=[common], help="calls waiting for your confirmation")
    pe.set_defaults(func=tool_pending)
    co = tv.add_parser("confirm", parents=[common], help="answer a confirmation request")
    co.add_argument("request", metavar="ID")
    co.add_argument("answer", choices=["yes", "y", "no", "n"], metavar="yes|no")
    when = co.add_mutually_exclusive_group()
    when.add_argument("--session", action="store_true", help="allow the tool for that session")
    when.add_argument("--always", action="store_true", help="allow the tool for good")
    co.set_defaults(func=tool_confirm)
    gr = tv.add_parser("grants", parents=[common], help="the tools you allowed for good")
    gr.set_defaults(func=tool_grants)
    rv = tv.add_parser("revoke", parents=[common], help="take back a tool's grants")
    rv.add_argument("name", nargs="?", metavar="TOOL")
    rv.add_argument("--all", action="store_true", help="every tool's")
    rv.set_defaults(func=tool_revoke, check=_check_revoke)

"""A small public task set for the tool loop: OS questions and actions, each with its check.

Each task is a prompt, the tools offered (``use_tools``), and what solving it means: the tool
the model must call, a test of the call's arguments, and optionally a fact the final answer
must contain.  The files the tasks ask about are made in the user's home by :func:`prepare`.
A task fails with the first of these that did not happen:

* ``no call``: the model answered without calling a tool;
* ``wrong tool``: it called only other tools;
* ``wrong arguments``: it called the tool, but not with arguments that do the task;
* ``tool failed``: the call was right but the tool did not succeed;
* ``answer lacks the fact``: the calls were right, the final answer does not say it.

Greedy decoding (temperature 0): a run is repeatable on one machine.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: [tools]/[llm] settings the scenario's daemon runs with: no confirmation waits (the set has
#: no destructive task), and room for the tool loop's replies.
DAEMON_EXTRA = '[tools]\nconfirm = "none"\n'

NOTES = "buy leeks\nbuy bread\ncall the plumber\n"


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    prompt: str
    tools: list[str]
    expect: str
    args_ok: Callable[[dict[str, Any], Path], bool]
    answer_has: str | None = None


@dataclasses.dataclass
class Outcome:
    solved: bool
    failure: str
    calls: str


def _path_is(target: str) -> Callable[[dict[str, Any], Path], bool]:
    def ok(args: dict[str, Any], home: Path) -> bool:
        p = str(args.get("path", "~"))
        full = os.path.normpath(os.path.join(str(home), p.replace("~", str(home), 1)))
        return full == os.path.normpath(str(home / target))

    return ok


def _any(args: dict[str, Any], home: Path) -> bool:
    return True


TASKS = [
    Task("cpus", "How many CPUs does this machine have?", ["system.info"], "system.info",
         _any, str(os.cpu_count())),
    Task("uptime", "How long has this machine been running?", ["system.info"], "system.info",
         _any),
    Task("list home", "List the files in my home directory.", ["fs.list"], "fs.list",
         _path_is(""), "notes.txt"),
    Task("read notes", "Read the file notes.txt in my home directory. What must I buy?",
         ["fs.read", "fs.list"], "fs.read", _path_is("notes.txt"), "leeks"),
    Task("find markdown", "Find the files whose name ends with .md in my home directory.",
         ["fs.search"], "fs.search",
         lambda a, h: str(a.get("name") or "").endswith(".md") or "md" in str(a.get("name")),
         "plan.md"),
    Task("grep", "Which file in my home directory mentions the plumber?", ["fs.search"],
         "fs.search", lambda a, h: "plumber" in str(a.get("contains") or ""), "notes.txt"),
    Task("disk usage", "How much disk space does my home directory use?", ["fs.du"], "fs.du",
         _path_is("")),
    Task("top memory", "Which processes use the most memory?", ["proc.list"], "proc.list",
         lambda a, h: a.get("sort") == "memory"),
    Task("process 1", "Show me the details of process 1.", ["proc.info"], "proc.info",
         lambda a, h: a.get("pid") == 1),
    Task("remember", "Remember that my favourite colour is green.", ["memory.add"],
         "memory.add", lambda a, h: "green" in str(a.get("content", "")).lower()),
    Task("storage search", "Search my storage for leeks.", ["storage.search"],
         "storage.search", lambda a, h: "leek" in str(a.get("query", "")).lower()),
    Task("choose a tool", "How much memory does this machine have?",
         ["fs.list", "system.info", "proc.info"], "system.info", _any),
]  # fmt: skip


def prepare(home: Path, uid: int, gid: int) -> None:
    """The files the tasks ask about, the user's own."""
    for name, text in (("notes.txt", NOTES), ("plan.md", "# plan\nfix the sink\n")):
        p = home / name
        p.write_text(text)
        p.chmod(0o600)
        os.chown(p, uid, gid)


def check(task: Task, result: dict[str, Any], home: Path) -> Outcome:
    """Whether ``result`` (of llm.chat with use_tools) does ``task``."""
    steps = result.get("steps") or []
    calls = ", ".join(f"{s['tool']}({_short(s['arguments'])})" for s in steps) or "-"
    if not steps:
        return Outcome(False, "no call", calls)
    right = [s for s in steps if s["tool"] == task.expect]
    if not right:
        return Outcome(False, "wrong tool", calls)
    good = [s for s in right if task.args_ok(s["arguments"], home)]
    if not good:
        return Outcome(False, "wrong arguments", calls)
    if not any(s["ok"] for s in good):
        return Outcome(False, "tool failed", calls)
    answer = str(result["message"].get("content") or "")
    if task.answer_has is not None and task.answer_has.lower() not in answer.lower():
        return Outcome(False, "answer lacks the fact", calls)
    return Outcome(True, "", calls)


def _short(args: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return text if len(text) <= 60 else text[:57] + "..."


def run_all(rpc: Any, home: Path) -> dict[str, list[Outcome]]:
    """Every task once through ``rpc`` (a member's connection): its outcome."""
    out: dict[str, list[Outcome]] = {}
    for task in TASKS:
        reply = rpc.call(
            "llm.chat",
            {
                "messages": [{"role": "user", "content": task.prompt}],
                "use_tools": task.tools,
                "max_steps": 3,
                "max_tokens": 128,
                "temperature": 0.0,
            },
        )
        if "error" in reply:
            out[task.name] = [Outcome(False, f"error: {reply['error']['message'][:60]}", "-")]
            continue
        out[task.name] = [check(task, reply["result"], home)]
    return out

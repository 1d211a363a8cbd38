"""Summarise the text files of a folder into the owner's storage, one model call per file.

The folder is ``$SUMMARIZE_DIR`` if set (relative to the working directory), else the first
argument (``args`` of ``agent.spawn`` by name), else the working directory.  Only the
folder's own regular files are read (not its subfolders, nor names starting with ``.``), in
name order, at most ``$SUMMARIZE_MAX_FILES`` of them and ``$SUMMARIZE_MAX_BYTES`` bytes of
each.  The agent reads them itself, as its owner: what they may not read is refused by the
kernel and skipped, like binary files, with a line on standard error.

Each summary goes to ``storage.put`` in ``$SUMMARIZE_COLLECTION`` (default ``summaries``)
under the file's name, with metadata ``source`` (the absolute path), ``size`` (the file's
size), ``read_bytes``, ``truncated``, ``model`` and ``agent`` (the AID).  One line per file
summarised is printed on standard output.  Exit status: 0 when the folder was gone through
(skipped files included), 1 when it cannot be listed or a syscall fails, 2 for bad settings.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from aiosd.errors import AiosError
from aiosd.sdk.agent import Agent, read_text
from aiosd.sdk.client import DaemonUnreachable

SYSTEM = "You summarise texts. Answer with one or two short sentences, nothing else."


def _setting(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    value = int(raw)  # ValueError: reported by main
    if value < 1:
        raise ValueError(f"{name} must be at least 1, not {value}")
    return value


def folder(argv: list[str]) -> Path:
    """The folder to summarise: $SUMMARIZE_DIR, else argv[1], else the working directory."""
    named = os.environ.get("SUMMARIZE_DIR") or (argv[1] if len(argv) > 1 else "")
    return Path(named or ".").absolute()


def one_line(text: str) -> str:
    """``text`` on one line (a summary printed per file must not break the one-line rule)."""
    return " ".join(text.split())


def run(agent: Agent, where: Path, max_files: int, max_bytes: int, collection: str) -> int:
    """Summarise ``where``'s files with ``agent``; the number of summaries stored."""
    names = sorted(n for n in os.listdir(where) if not n.startswith("."))
    aid = agent.identity().aid
    done = 0
    for name in names[:max_files]:
        path = where / name
        if path.is_dir():
            continue
        try:
            text, truncated = read_text(path, max_bytes)
            size = path.stat().st_size
        except OSError as exc:
            print(f"skip {name}: cannot read: {exc.strerror or exc}", file=sys.stderr, flush=True)
            continue
        except ValueError as exc:
            print(f"skip {name}: {exc}", file=sys.stderr, flush=True)
            continue
        if not text.strip():
            print(f"skip {name}: empty", file=sys.stderr, flush=True)
            continue
        result = agent.complete(
            [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Summarise this text:\n\n{text}"},
            ],
            temperature=0.0,
        )
        summary = one_line(str(result["message"]["content"]))
        if not summary:
            print(f"skip {name}: the model gave no summary", file=sys.stderr, flush=True)
            continue
        meta = {
            "source": str(path),
            "size": size,
            "read_bytes": len(text.encode()),
            "truncated": truncated,
            "model": result["model"],
            "agent": aid,
        }
        agent.store(collection, name, summary, meta)
        done += 1
        print(f"{name}: {summary}", flush=True)
    if len(names) > max_files:
        print(
            f"note: only the first {max_files} of {len(names)} entries were looked at "
            "(SUMMARIZE_MAX_FILES)",
            file=sys.stderr,
            flush=True,
        )
    return done


def main(argv: list[str]) -> int:
    try:
        max_files = _setting("SUMMARIZE_MAX_FILES", 20)
        max_bytes = _setting("SUMMARIZE_MAX_BYTES", 4096)
        max_tokens = _setting("SUMMARIZE_MAX_TOKENS", 64)
    except ValueError as exc:
        print(f"summarize: {exc}", file=sys.stderr)
        return 2
    collection = os.environ.get("SUMMARIZE_COLLECTION") or "summaries"
    where = folder(argv)
    try:
        with Agent(max_tokens=max_tokens) as agent:
            done = run(agent, where, max_files, max_bytes, collection)
    except OSError as exc:
        if isinstance(exc, DaemonUnreachable):
            print(f"summarize: {exc}", file=sys.stderr)
        else:
            print(f"summarize: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except AiosError as exc:
        print(f"summarize: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"summarize: {done} summaries stored in {collection}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

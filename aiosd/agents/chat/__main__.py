"""A conversation with the model that remembers: each message is answered with what was said
before that shares words with it.

An agent's standard input is ``/dev/null``, so the messages come from one of (the first set):

* ``$CHAT_INPUT``: a file, one message per line (read as the owner);
* ``$CHAT_MESSAGES``: the messages themselves, one per line;
* ``$CHAT_INBOX``: a key of the owner's storage collection ``inbox``, one message per line.

Every message goes through :meth:`aiosd.sdk.agent.Agent.chat`: the past exchanges that match
its words are recalled from memory into the prompt, and the new exchange is remembered.
Memory is the agent's own space ``agent-<aid>`` unless ``$CHAT_SPACE`` names one, which a
later run can then recall from too.  The exchanges are pinned (``$CHAT_PIN=0``: not), so
that they outlive the agent: the unpinned entries of an agent's space go when it ends, the
pinned ones are kept in the owner's storage, where ``memory.search`` still finds them.

For each message, standard output gets ``> message``, ``< answer`` and ``# recalled [ids]
remembered id``; with ``$CHAT_DEBUG`` set, standard error also gets the messages sent to the
model, as JSON.  The transcript is stored in the collection ``chats`` under
``YYYY-MM-DD/HHMMSS-<aid>`` (UTC, when the run started), with the recalled and remembered ids
of each turn in its metadata.

Exit status: 0 when every message was answered, 1 when a syscall fails or the input cannot
be read, 2 when no input is given.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from aiosd.errors import AiosError
from aiosd.sdk.agent import Agent, Reply

#: Messages answered at most per run, and characters kept of each.
MAX_MESSAGES = 64
MAX_MESSAGE_CHARS = 2000
SYSTEM = "You are a helpful assistant. Answer briefly."


def messages(agent: Agent) -> list[str]:
    """The user's messages, from the first source set; ValueError if none is."""
    if path := os.environ.get("CHAT_INPUT"):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(MAX_MESSAGES * MAX_MESSAGE_CHARS)
    elif "CHAT_MESSAGES" in os.environ:
        text = os.environ["CHAT_MESSAGES"]
    elif key := os.environ.get("CHAT_INBOX"):
        text = str(agent.client.call("storage.get", {"collection": "inbox", "key": key})["value"])
    else:
        raise ValueError("no messages: set CHAT_INPUT (a file), CHAT_MESSAGES or CHAT_INBOX")
    lines = [line.strip()[:MAX_MESSAGE_CHARS] for line in text.splitlines()]
    return [line for line in lines if line][:MAX_MESSAGES]


def transcript(turns: list[tuple[str, Reply]]) -> str:
    """The conversation as text: ``user: ...`` and ``assistant: ...`` lines."""
    out = []
    for prompt, reply in turns:
        out += [f"user: {prompt}", f"assistant: {' '.join(reply.text.split())}"]
    return "\n".join(out) + "\n"


def main() -> int:
    started = time.gmtime()
    debug = bool(os.environ.get("CHAT_DEBUG"))
    pin = os.environ.get("CHAT_PIN", "1") not in ("0", "")
    try:
        with Agent(space=os.environ.get("CHAT_SPACE") or None, max_tokens=64) as agent:
            try:
                prompts = messages(agent)
            except ValueError as exc:
                print(f"chat: {exc}", file=sys.stderr)
                return 2
            me = agent.identity()
            turns: list[tuple[str, Reply]] = []
            for n, prompt in enumerate(prompts, 1):
                reply = agent.chat(prompt, recall=3, pin=pin, system=SYSTEM, temperature=0.0)
                turns.append((prompt, reply))
                if debug:
                    print(f"prompt {n}: {json.dumps(reply.messages)}", file=sys.stderr)
                ids = [m.id for m in reply.recalled]
                if pin and not reply.pinned:
                    print("chat: the pinned memory budget is full: not pinned", file=sys.stderr)
                print(f"> {prompt}", flush=True)
                print(f"< {' '.join(reply.text.split())}", flush=True)
                print(f"# recalled {ids} remembered {reply.remembered}", flush=True)
            key = time.strftime("%Y-%m-%d/%H%M%S", started) + f"-{me.aid or 'noagent'}"
            meta: dict[str, Any] = {
                "agent": me.aid,
                "space": agent.space or me.space,
                "model": turns[0][1].result["model"] if turns else None,
                "turns": [
                    {
                        "recalled": [m.id for m in r.recalled],
                        "remembered": r.remembered,
                        "pinned": r.pinned,
                    }
                    for _, r in turns
                ],
            }
            agent.store("chats", key, transcript(turns), meta)
            print(f"# transcript chats/{key}", flush=True)
    except OSError as exc:  # the daemon unreachable, or CHAT_INPUT unreadable
        print(f"chat: {exc}", file=sys.stderr)
        return 1
    except AiosError as exc:
        print(f"chat: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers for agent programs: the agent's own identity, memory, the model and storage.

An agent is a process that the daemon started (``agent.spawn``).  It finds the daemon in
``$AIOSD_SOCKET``, and the daemon knows it is that agent from the kernel, not from anything
it sends: ``$AIOSD_AGENT_ID`` only says which AID to expect, and :meth:`Agent.identity` asks
the daemon (``system.status``'s ``caller_aid``).  The same helpers work outside an agent
(say, a test or a script run by hand): memory calls then go to the connection's session
unless a space is named.

The chat loop of :meth:`Agent.chat` is what makes an agent remember: before asking the
model it *recalls* the past exchanges that share words with the prompt (``memory.search``,
one word at a time, because a search matches only entries holding every word of its query),
gives them to the model in a system message, and afterwards *remembers* the new exchange
(``memory.add``), so a later question can use an earlier fact.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import time
from pathlib import Path
from typing import Any

from aiosd.errors import Busy, QuotaExceeded
from aiosd.sdk.client import Client

#: Words left out of recall queries: they occur in nearly every exchange.
STOPWORDS = frozenset(
    """a an and any are as at be but by can could did do does for from had has have he her his
    how i if in into is it its just me my no not of on or our she so than that the their them
    then there these they this to too up us was we were what when where which who why will with
    would you your about tell said say says please know""".split()
)
#: Words of a prompt searched for at most: each is one memory.search.
MAX_RECALL_WORDS = 8
#: Tries of a request the model's queue turns away (Busy), with waits doubling from 0.5 s.
BUSY_TRIES = 5
#: Tag of the exchanges that :meth:`Agent.chat` remembers.
EXCHANGE_TAG = "exchange"


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who the daemon says the caller is."""

    aid: str | None  # None: the connection is not an agent's
    uid: int
    role: str  # "admin" or "user"

    @property
    def space(self) -> str | None:
        """The agent's own memory space (``agent-<aid>``); None outside an agent."""
        return f"agent-{self.aid}" if self.aid else None


@dataclasses.dataclass(frozen=True)
class Memory:
    """One recalled memory entry."""

    id: int
    content: str
    score: float


@dataclasses.dataclass(frozen=True)
class Reply:
    """What :meth:`Agent.chat` did: the answer, the memories it used and the one it added."""

    text: str
    #: The entries recalled and put in the prompt, best first.
    recalled: list[Memory]
    #: The id of the entry that remembers this exchange (None with remember=False).
    remembered: int | None
    #: Whether that entry is pinned (asked with pin=True, and the pinned budget had room).
    pinned: bool
    #: The messages sent to ``llm.chat``, recalled memories included.
    messages: list[dict[str, str]]
    #: ``llm.chat``'s whole result (model, usage, timings, ...).
    result: dict[str, Any]


def keywords(text: str, limit: int = MAX_RECALL_WORDS) -> list[str]:
    """The words of ``text`` worth searching memory for: lower case, in order, without
    duplicates, stopwords or words shorter than 3 characters; at most ``limit``."""
    out: list[str] = []
    for word in re.findall(r"[^\W_]+", text.lower()):
        if len(word) >= 3 and word not in STOPWORDS and word not in out:
            out.append(word)
    return out[:limit]


class Agent:
    """One connection to the daemon, with the helpers an agent program needs.

    ``client`` is any object with the blocking ``call(method, params)`` of
    :class:`~aiosd.sdk.Client` (default: a new Client on ``$AIOSD_SOCKET``).  ``space`` is the
    memory space of :meth:`remember`, :meth:`recall` and :meth:`chat`: None uses the
    daemon's default, which for an agent is its own space ``agent-<aid>`` (its unpinned
    entries go when the agent ends); name one to share memory between runs (a named space
    lasts as long as the daemon runs).
    """

    def __init__(
        self,
        client: Any = None,
        *,
        space: str | None = None,
        model: str | None = None,
        max_tokens: int = 96,
    ) -> None:
        self.client = client if client is not None else Client()
        self.space = space
        self.model = model
        self.max_tokens = max_tokens
        self._identity: Identity | None = None

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a client without ``close`` is left alone)."""
        close = getattr(self.client, "close", None)
        if close is not None:
            close()

    @property
    def aid_hint(self) -> str | None:
        """``$AIOSD_AGENT_ID``: the AID the daemon gave this process, as told at start.  Only
        informative: a process can set it itself; :meth:`identity` is what the daemon says."""
        return os.environ.get("AIOSD_AGENT_ID") or None

    def identity(self) -> Identity:
        """Who the daemon sees on this connection (``system.status``), asked once."""
        if self._identity is None:
            st = self.client.call("system.status")
            self._identity = Identity(st.get("caller_aid"), st["caller_uid"], st["caller_role"])
        return self._identity

    def _space(self) -> dict[str, Any]:
        return {"space": self.space} if self.space is not None else {}

    # --- memory -------------------------------------------------------------------------

    def remember(self, content: str, tags: list[str] | None = None, pinned: bool = False) -> int:
        """Add ``content`` to the memory space; the new entry's id.

        Unpinned entries of an agent's own space go when the agent ends (as a closed
        session's do), and may be evicted for the budgets; pinned ones are kept, moved to the
        owner's storage, where ``memory.search`` in ``agent-<aid>`` still finds them.
        """
        params = {"content": content, "tags": tags or [], "pinned": pinned, **self._space()}
        entry: dict[str, Any] = self.client.call("memory.add", params)
        return int(entry["id"])

    def recall(self, query: str, k: int = 3) -> list[Memory]:
        """The ``k`` entries that best match the words of ``query``, best first.

        A ``memory.search`` finds only entries holding *every* word of its query, so a
        question ("What is my cat called?") would miss the statement it asks about ("My cat
        is called Tilly.").  Each keyword is searched on its own instead, and an entry's
        score is the sum over the words it holds: more shared words rank higher.
        """
        if k <= 0:
            return []
        found: dict[int, Memory] = {}
        for word in keywords(query):
            params = {"query": word, "limit": min(max(k, 10), 100), **self._space()}
            for hit in self.client.call("memory.search", params)["hits"]:
                seen = found.get(hit["id"])
                score = float(hit["score"]) + (seen.score if seen else 0.0)
                found[hit["id"]] = Memory(int(hit["id"]), str(hit["content"]), score)
        return sorted(found.values(), key=lambda m: (-m.score, -m.id))[:k]

    # --- the model ----------------------------------------------------------------------

    def complete(self, messages: list[dict[str, str]], **params: Any) -> dict[str, Any]:
        """``llm.chat`` with ``messages``; a request the full queue turns away (Busy) is
        tried again a few times, since a batch agent competes with everyone for the model."""
        body: dict[str, Any] = {"messages": messages, "max_tokens": self.max_tokens}
        if self.model is not None:
            body["model"] = self.model
        body.update(params)
        for attempt in range(BUSY_TRIES):
            try:
                result: dict[str, Any] = self.client.call("llm.chat", body)
                return result
            except Busy:
                if attempt == BUSY_TRIES - 1:
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def chat(
        self,
        prompt: str,
        *,
        remember: bool = True,
        recall: int = 3,
        pin: bool = False,
        system: str | None = None,
        **params: Any,
    ) -> Reply:
        """Answer ``prompt`` with the model, using and adding to memory.

        The ``recall`` best matching past entries (see :meth:`recall`) go into a system
        message after ``system``, oldest first as they happened; with ``remember``, the
        exchange is then added to memory, tagged ``exchange``, as "User: ...\\nAssistant:
        ...", pinned with ``pin`` (so that it outlives the agent; see :meth:`remember`).  The
        pinned budget is small and shared by all of the owner's spaces: when it is full, the
        exchange is remembered unpinned rather than lost.  ``params`` go to ``llm.chat``
        (``max_tokens``, ``temperature``, ``seed``...).
        """
        recalled = self.recall(prompt, recall)
        lines = [system] if system else []
        if recalled:
            lines.append("What you remember from earlier in this conversation:")
            lines += [f"- {m.content}" for m in sorted(recalled, key=lambda m: m.id)]
        messages = [{"role": "system", "content": "\n".join(lines)}] if lines else []
        messages.append({"role": "user", "content": prompt})
        result = self.complete(messages, **params)
        text = str(result["message"]["content"]).strip()
        entry, pinned = None, False
        if remember:
            content = f"User: {prompt}\nAssistant: {text}"
            try:
                entry, pinned = self.remember(content, [EXCHANGE_TAG], pin), pin
            except QuotaExceeded:
                if not pin:
                    raise
                entry = self.remember(content, [EXCHANGE_TAG])
        return Reply(text, recalled, entry, pinned, messages, result)

    # --- storage ------------------------------------------------------------------------

    def store(
        self, collection: str, key: str, value: str, metadata: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """``storage.put`` of a text value in the owner's storage; the new version's record."""
        params: dict[str, Any] = {"collection": collection, "key": key, "value": value}
        if metadata is not None:
            params["metadata"] = metadata
        result: dict[str, Any] = self.client.call("storage.put", params)
        return result


def read_text(path: Path | str, max_bytes: int) -> tuple[str, bool]:
    """At most ``max_bytes`` of the regular file ``path`` as UTF-8, and whether there was
    more.  ValueError for what is not text (NUL bytes, not UTF-8, not a regular file);
    OSError as the kernel says (an agent runs as its owner: it reads what they may read).

    Opened without blocking, so a FIFO in the folder cannot hang the agent; a character
    cut in two by the limit is dropped, not taken for binary data.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    more = len(data) > max_bytes
    data = data[:max_bytes]
    if b"\0" in data:
        raise ValueError("binary (NUL bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not (more and exc.start >= len(data) - 3 and exc.reason == "unexpected end of data"):
            raise ValueError("not UTF-8 text") from None
        text = data[: exc.start].decode("utf-8")
    return text, more


__all__ = ["Agent", "Identity", "Memory", "Reply", "keywords", "read_text"]

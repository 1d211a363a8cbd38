r"""The audit trail: one record per access decision, written by a bounded writer thread.

Every syscall leaves a record, so the record's cost is paid on every call.  A record is
formatted on the caller's thread and handed to one writer thread, which makes the
``write(2)`` (several queued records in one) or, under journald, the ``sd_journal_send``
with structured fields.  The event loop therefore never waits on a slow stderr pipe or a
backlogged journal: the watchdog would kill a daemon whose loop did.

The queue is bounded (:data:`QUEUE_LIMIT` records).  When the writer falls that far behind,
new records are counted instead of queued, and a record saying how many were lost is written
as soon as there is room again: memory stays bounded and the loss is itself on the record.
:func:`flush` waits until everything queued is written (the daemon's stop calls it).

It follows the ``aiosd.audit`` logger's level: with ``log_level`` above ``info`` nothing is
written.  Where the records go is set with the rest of the logging
(:func:`aiosd.daemon.setup_logging`): the journal, or a stream (stderr by default).

A record's strings come from callers (a method name, a parameter's name quoted in an error), so
no record can be forged: each is exactly one line, and reads back unambiguously.  On a stream::

    aiosd[DAEMON_PID]: INFO aiosd.audit: SYSCALL uid=UID pid=PID aid=AID verdict=VERDICT[ (DETAIL)]

``UID`` and ``PID`` are decimal; ``VERDICT`` is one word (``ok``, ``denied``, ``invalid``,
``unknown``, ``failed``); ``AID`` is ``-`` when the caller is no agent.  ``DETAIL``, when
there is one, runs from `` (`` to the ``)`` that ends the line.  Every string is escaped
(:func:`escape`): ``\\`` for a backslash, ``\n``, ``\r``, ``\t``, and ``\xHH``,
``\uHHHH`` or ``\UHHHHHHHH`` for every other character that is not printable
(controls, line and paragraph separators, spaces other than U+0020, lone surrogates).
``SYSCALL`` and ``AID`` are single words besides: a space in them is ``\x20`` and a ``"``
``\x22``; an empty one is written ``""`` and an agent id ``-`` as ``\x2d``.  So the line
splits at its first five spaces into ``SYSCALL`` and the four ``key=value`` fields, the rest
being `` (DETAIL)``, and no string can end the line or fill in another field.  (The note on
lost records, ``audit: N record(s) lost: …``, holds no caller's string.)

Under journald the message is the same line without the stream's prefix, and the structured
fields carry the strings unescaped: ``AIOS_SYSCALL``, ``AIOS_UID``, ``AIOS_PID``, ``AIOS_AID``,
``AIOS_VERDICT`` and, when there is one, ``AIOS_DETAIL``.

The daemon's other log lines can quote callers too: :class:`OneLineFormatter` escapes them the
same way.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

LOGGER = "aiosd.audit"
#: Journal MESSAGE_ID of every audit record: ``journalctl MESSAGE_ID=…`` lists them all.
MESSAGE_ID = "6f1d2b64c0e94a3f9c1a7d2e5b8a4c10"
_INFO = logging.INFO
#: Records the writer may fall behind by before new ones are counted as lost.
QUEUE_LIMIT = 10_000
#: The writer thread ends after this long with nothing to write (a new record restarts it).
IDLE_EXIT = 1.0
#: How long the writer lets records gather once one arrives (seconds): the most a record
#: waits before its write starts.
LINGER = 0.005

_logger = logging.getLogger(LOGGER)


@dataclass(frozen=True)
class _Target:
    """Where records go: journald's ``send``, else a stream (None: ``sys.stderr`` then)."""

    send: Callable[..., Any] | None
    stream: IO[str] | None
    prefix: str


def _line_prefix() -> str:
    return f"aiosd[{os.getpid()}]: INFO {LOGGER}: "  # getpid is a syscall: once, not per line


#: Each record takes the target current when it was made, so switching never waits for the
#: writer: what was recorded before a switch still goes where it was meant to.
_target = _Target(None, None, _line_prefix())


def to_journal() -> None:
    """Send records to journald, with the fields ``AIOS_SYSCALL``, ``AIOS_UID``… ."""
    global _target
    from systemd.journal import send

    _target = _Target(send, None, _line_prefix())


def to_stream(stream: IO[str] | None = None) -> None:
    """Write records as lines to ``stream``; ``None`` means whatever ``sys.stderr`` is then."""
    global _target
    _target = _Target(None, stream, _line_prefix())


#: One queued record: (target, message, uid, pid, aid, syscall, verdict, detail).
_Record = tuple[_Target, str, int, int, str, str, str, str]

_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(ch: str) -> str:
    short = _SHORT.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(text: str) -> str:
    """``text`` on one line: backslashes and characters that are not printable escaped."""
    if text.isprintable() and "\\" not in text:  # nearly always: no per-character work
        return text
    return "".join(ch if ch.isprintable() and ch != "\\" else _escaped(ch) for ch in text)


def _word(text: str) -> str:
    """``text`` as one word of a record: :func:`escape`, and no space or ``"`` in it."""
    if not text:
        return '""'
    if text == "-":
        return "\\x2d"  # "-" alone means "none"
    if text.isprintable() and " " not in text and "\\" not in text and '"' not in text:
        return text
    return "".join(ch if ch.isprintable() and ch not in ' "\\' else _escaped(ch) for ch in text)


class OneLineFormatter(logging.Formatter):
    """A log formatter that writes each record, traceback included, as one escaped line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record formatted as usual, then passed through :func:`escape`."""
        return escape(super().format(record))


class _Writer:
    """The queue of records and the thread that writes them."""

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.queue: collections.deque[_Record] = collections.deque()
        self.dropped = 0
        self.busy = False  # the thread holds records taken from the queue, not yet written
        self.stopping = False
        #: The last write failed unexpectedly: the lost-records note waits for a new record.
        self.stalled = False
        self.thread: threading.Thread | None = None

    def _pending(self) -> bool:
        return bool(self.queue) or (self.dropped > 0 and not self.stalled)

    def put(self, rec: _Record) -> None:
        with self.cond:
            if len(self.queue) >= QUEUE_LIMIT:
                self.dropped += 1
                return
            self.queue.append(rec)
            if self.thread is None:
                thread = threading.Thread(target=self._run, name="audit", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no thread can start (interpreter exit): counted lost
                    self.queue.pop()
                    self.dropped += 1
                    return
                self.thread = thread
            elif len(self.queue) == 1:
                self.cond.notify()

    def _run(self) -> None:
        try:
            while self._step():
                pass
        finally:
            # However the thread ends, the next record starts a new one.
            with self.cond:
                if self.thread is threading.current_thread():
                    self.thread = None
                self.busy = False
                self.cond.notify_all()

    def _step(self) -> bool:
        """Write one batch; False when the writer has been idle long enough to end."""
        with self.cond:
            if not self._pending():
                if not self.stopping:
                    self.cond.wait(IDLE_EXIT)
                if not self._pending():
                    return False
        if not self.stopping:
            # Let records gather: one wake-up and one write(2) for many of them, instead
            # of a thread switch per record taking the GIL from the event loop.
            time.sleep(LINGER)
        with self.cond:
            batch, self.queue = self.queue, collections.deque()
            dropped, self.dropped = self.dropped, 0
            self.busy = True
        try:
            if dropped:
                note = f"audit: {dropped} record(s) lost: the audit writer fell behind"
                batch.appendleft((_target, note, -1, -1, "", "audit", "lost", ""))
            _write(batch)
        except Exception:  # a sink that fails in a way no write anticipated: count, go on
            with self.cond:
                self.dropped += dropped + len(batch) - (1 if dropped else 0)
                self.stalled = True
        else:
            self.stalled = False
        finally:
            with self.cond:
                self.busy = False
                self.cond.notify_all()  # wakes flush()
        return True

    def flush(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self._pending() or self.busy:
                left = deadline - time.monotonic()
                if left <= 0 or self.thread is None:
                    return False
                self.cond.wait(left)
        return True

    def stop(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        written = self.flush(timeout)
        with self.cond:
            thread = self.thread
            self.stopping = True
            self.cond.notify_all()
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self.cond:
            self.stopping = False
        return written


_writer = _Writer()


def flush(timeout: float = 5.0) -> bool:
    """Wait until every record queued so far is written; False if ``timeout`` ran out."""
    return _writer.flush(timeout)


def stop(timeout: float = 5.0) -> bool:
    """:func:`flush`, then end the writer thread now (a later record starts a new one);
    all within ``timeout``."""
    return _writer.stop(timeout)


def record(uid: int, pid: int, aid: str | None, syscall: str, verdict: str, detail: str) -> None:
    """Queue one audit record (nothing when the ``aiosd.audit`` logger is above info).

    Never raises and never waits for the write: a caller's request must not fail, nor stall,
    because its record could not be written yet.
    """
    if not _logger.isEnabledFor(_INFO):
        return
    message = (
        f"{_word(syscall)} uid={uid} pid={pid} aid={_word(aid) if aid else '-'} verdict={verdict}"
    )
    if detail:
        message += f" ({escape(detail)})"
    _writer.put((_target, message, uid, pid, aid or "", syscall, verdict, detail))


def _write(batch: collections.deque[_Record]) -> None:
    """Write records, each where it was meant to go (in the writer thread)."""
    lines: list[str] = []
    current: _Target | None = None
    for target, message, uid, pid, aid, syscall, verdict, detail in batch:
        if target is not current:
            if lines and current is not None:
                _write_lines(current, "".join(lines))
            lines, current = [], target
        if target.send is not None:
            try:
                target.send(
                    message,
                    MESSAGE_ID=MESSAGE_ID,
                    # Given, so that the binding does not walk the stack to find them.
                    CODE_FILE=__file__,
                    CODE_LINE=0,
                    CODE_FUNC="record",
                    PRIORITY=6,
                    SYSLOG_IDENTIFIER="aiosd",
                    LOGGER=LOGGER,
                    AIOS_SYSCALL=syscall,
                    AIOS_UID=uid,
                    AIOS_PID=pid,
                    AIOS_AID=aid,
                    AIOS_VERDICT=verdict,
                    **({"AIOS_DETAIL": detail} if detail else {}),
                )
                continue
            except (OSError, UnicodeError):
                pass  # journald refused it, or a name no UTF-8 can carry: stderr gets it
        lines.append(f"{target.prefix}{message}\n")
    if lines and current is not None:
        _write_lines(current, "".join(lines))


def _write_lines(target: _Target, text: str) -> None:
    # A method name may hold lone surrogates (JSON "\udc80"): written escaped, never refused.
    data = text.encode("utf-8", "backslashreplace")
    stream = target.stream if target.stream is not None else sys.stderr
    try:
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):
            # Not a real file (a test's capture, say): its own write.
            stream.write(data.decode())
            stream.flush()
            return
        stream.flush()  # keep order with whatever was written to it through Python
        while data:
            data = data[os.write(fd, data) :]
    except (OSError, ValueError):
        pass  # stderr is gone (a closed pipe): there is nowhere left to write the record

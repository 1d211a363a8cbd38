"""The audit trail: one record per access decision, written at once.

Every syscall leaves a record, so the record's cost is paid on every call: written through
the generic ``logging`` machinery it cost about 7 µs (a LogRecord, caller lookup, a formatter,
a lock, a flush), more than a cheap syscall itself.  This writer formats one line and makes one
``write(2)`` (or, under journald, one ``sd_journal_send`` with structured fields), still before
the reply leaves, so no record can be lost to a buffer.

It follows the ``aiosd.audit`` logger's level: with ``log_level`` above ``info`` nothing is
written, as before.  Where the records go is set with the rest of the logging
(:func:`aiosd.daemon.setup_logging`): the journal, or a stream (stderr by default).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import IO, Any

LOGGER = "aiosd.audit"
#: Journal MESSAGE_ID of every audit record: ``journalctl MESSAGE_ID=…`` lists them all.
MESSAGE_ID = "6f1d2b64c0e94a3f9c1a7d2e5b8a4c10"
_INFO = logging.INFO

_logger = logging.getLogger(LOGGER)
_journal_send: Callable[..., Any] | None = None
_stream: IO[str] | None = None
_prefix = f"aiosd[{os.getpid()}]: INFO {LOGGER}: "


def to_journal() -> None:
    """Send records to journald, with the fields ``AIOS_SYSCALL``, ``AIOS_UID``… ."""
    global _journal_send, _stream
    from systemd.journal import send

    _journal_send, _stream = send, None


def to_stream(stream: IO[str] | None = None) -> None:
    """Write records as lines to ``stream``; ``None`` means whatever ``sys.stderr`` is then."""
    global _journal_send, _stream, _prefix
    _journal_send, _stream = None, stream
    _prefix = f"aiosd[{os.getpid()}]: INFO {LOGGER}: "  # getpid is a syscall: once, not per line


def record(uid: int, pid: int, aid: str | None, syscall: str, verdict: str, detail: str) -> None:
    """Write one audit record (nothing when the ``aiosd.audit`` logger is above info).

    Never raises: a caller's request must not fail because its record could not be written.
    """
    if not _logger.isEnabledFor(_INFO):
        return
    message = f"{syscall} uid={uid} pid={pid} aid={aid or '-'} verdict={verdict}" + (
        f" ({detail})" if detail else ""
    )
    if _journal_send is not None:
        try:
            _journal_send(
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
                AIOS_AID=aid or "",
                AIOS_VERDICT=verdict,
            )
            return
        except (OSError, UnicodeError):
            pass  # journald refused it, or a name no UTF-8 can carry: stderr gets it
    # A method name may hold lone surrogates (JSON "\udc80"): written escaped, never refused.
    data = f"{_prefix}{message}\n".encode("utf-8", "backslashreplace")
    stream = _stream if _stream is not None else sys.stderr
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

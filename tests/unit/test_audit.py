"""Audit records under journald: structured fields through the real sd_journal_send."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

from aiosd.managers import audit

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")


@pytest.fixture
def audit_to_journal() -> Iterator[None]:
    logger = logging.getLogger(audit.LOGGER)
    before = logger.level
    logger.setLevel(logging.INFO)
    audit.to_journal()
    try:
        yield
    finally:
        audit.to_stream(None)
        audit.stop()
        logger.setLevel(before)


def _fields(datagram: bytes) -> dict[str, str]:
    """Parse journald's native protocol (only plain ``KEY=value`` lines are expected here)."""
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


def test_a_record_reaches_the_journal_with_its_fields(audit_to_journal: None) -> None:
    syscall = f"test.audit-{uuid.uuid4().hex[:8]}"
    if JOURNAL_SOCKET.exists():
        # journald runs here: look the record up through it.
        audit.record(4242, 17, "agent-1", syscall, "denied", "why")
        assert audit.flush()
        out = subprocess.run(
            ["journalctl", "--no-pager", "-o", "json", f"AIOS_SYSCALL={syscall}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        fields = json.loads(out.splitlines()[-1])
    else:
        # No journald: stand where it listens and read the datagram libsystemd sends.
        JOURNAL_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(JOURNAL_SOCKET))
            try:
                audit.record(4242, 17, "agent-1", syscall, "denied", "why")
                assert audit.flush()
                sock.settimeout(5)
                fields = _fields(sock.recv(65536))
            finally:
                JOURNAL_SOCKET.unlink()
                with_parent = JOURNAL_SOCKET.parent
                if not any(with_parent.iterdir()):
                    with_parent.rmdir()
    assert fields["MESSAGE"] == f"{syscall} uid=4242 pid=17 aid=agent-1 verdict=denied (why)"
    assert fields["MESSAGE_ID"] == audit.MESSAGE_ID
    assert fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "aiosd"
    assert fields["AIOS_SYSCALL"] == syscall
    assert fields["AIOS_UID"] == "4242"
    assert fields["AIOS_PID"] == "17"
    assert fields["AIOS_AID"] == "agent-1"
    assert fields["AIOS_VERDICT"] == "denied"
    assert fields["AIOS_DETAIL"] == "why"


def test_a_record_never_fails_the_request(tmp_path: Path) -> None:
    logger = logging.getLogger(audit.LOGGER)
    before = logger.level
    logger.setLevel(logging.INFO)
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads: every write gets EPIPE
    try:
        with os.fdopen(write_end, "w") as broken:
            audit.to_stream(broken)
            audit.record(0, 1, None, "system.status", "ok", "")  # must not raise
            assert audit.flush()  # and the writer survives the broken pipe
        with (tmp_path / "audit.log").open("w+") as sink:
            audit.to_stream(sink)
            audit.record(0, 1, None, "\udc80", "unknown", "")
            assert audit.flush()
            sink.seek(0)
            assert sink.read().endswith("aiosd.audit: \\udc80 uid=0 pid=1 aid=- verdict=unknown\n")
    finally:
        audit.to_stream(None)
        audit.stop()
        logger.setLevel(before)


def test_the_documented_message_id_is_the_one_sent() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs"
    for page in ("protocol.md", "design.md", "man/aiosd.8"):
        assert audit.MESSAGE_ID in (docs / page).read_text(), page


def test_a_stalled_sink_never_stalls_the_caller_and_losses_are_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    logger = logging.getLogger(audit.LOGGER)
    before = logger.level
    logger.setLevel(logging.INFO)
    monkeypatch.setattr(audit, "QUEUE_LIMIT", 100)
    read_end, write_end = os.pipe()
    total = 5000  # far more than the pipe (64 KiB) and the queue (100) hold together
    recorded = threading.Event()

    def record_all() -> None:
        for i in range(total):
            audit.record(0, 1, None, f"test.rec{i}", "ok", "")
        recorded.set()

    try:
        with os.fdopen(write_end, "w") as sink:
            audit.to_stream(sink)
            caller = threading.Thread(target=record_all)
            caller.start()
            # Nobody reads the pipe yet: the writer is stuck in write(2), the caller is not.
            assert recorded.wait(30), "audit.record waited for the stalled sink"
            caller.join()
            chunks: list[bytes] = []
            reader = threading.Thread(
                target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b""))
            )
            reader.start()
            assert audit.flush(30)
            audit.to_stream(None)
        reader.join(30)
    finally:
        audit.to_stream(None)
        audit.stop()
        logger.setLevel(before)
        os.close(read_end)
    lines = b"".join(chunks).decode().splitlines()
    kept = [ln for ln in lines if " verdict=ok" in ln]
    lost = [ln for ln in lines if "record(s) lost" in ln]
    assert 0 < len(kept) < total
    assert lost, "records were lost without a record saying so"
    n_lost = sum(int(re.search(r"audit: (\d+) record\(s\) lost", ln)[1]) for ln in lost)  # type: ignore[index]
    assert len(kept) + n_lost == total  # every record is either written or counted


def test_a_sink_that_raises_does_not_end_auditing(tmp_path: Path) -> None:
    class Exploding:
        """A stream with no file descriptor whose writes fail in an unforeseen way."""

        def write(self, text: str) -> int:
            raise RuntimeError("boom")

        def flush(self) -> None:
            pass

    logger = logging.getLogger(audit.LOGGER)
    before = logger.level
    logger.setLevel(logging.INFO)
    try:
        audit.to_stream(Exploding())  # type: ignore[arg-type]
        audit.record(0, 1, None, "test.first", "ok", "")  # must not raise
        assert audit.flush(10), "flush waited on a record that can never be written"
        with (tmp_path / "audit.log").open("w+") as sink:
            audit.to_stream(sink)
            audit.record(0, 1, None, "test.second", "ok", "")
            assert audit.flush(10)
            sink.seek(0)
            text = sink.read()
    finally:
        audit.to_stream(None)
        audit.stop()
        logger.setLevel(before)
    assert "test.second uid=0" in text  # the writer lives on
    assert "audit: 1 record(s) lost" in text  # and says what the broken sink cost


# --- records cannot be forged ------------------------------------------------------------------

#: A complete audit record, as a caller would smuggle it into a string of theirs.
FORGED = "aiosd[1]: INFO aiosd.audit: system.reload uid=0 pid=1 aid=- verdict=ok"

#: The documented line of a record written to a stream (see managers/audit.py).
RECORD = re.compile(
    r"aiosd\[(\d+)\]: INFO aiosd\.audit: (\S+) uid=(-?\d+) pid=(-?\d+) aid=(\S+) "
    r"verdict=(\w+)(?: \((.*)\))?"
)
_ESCAPE = re.compile(r"\\(?:x([0-9a-f]{2})|u([0-9a-f]{4})|U([0-9a-f]{8})|(.))")
_SHORT = {"\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def unescape(text: str) -> str:
    """The string an escaped field of a record stands for (the documented escapes)."""
    if text == '""':
        return ""

    def one(m: re.Match[str]) -> str:
        code = m[1] or m[2] or m[3]
        return chr(int(code, 16)) if code else _SHORT[m[4]]

    return _ESCAPE.sub(one, text)


def parse(line: str) -> dict[str, object] | None:
    """A record line's fields, unescaped; None when the line is not a record."""
    m = RECORD.fullmatch(line)
    if m is None:
        return None
    aid = None if m[5] == "-" else unescape(m[5])
    detail = "" if m[7] is None else unescape(m[7])
    return {
        "syscall": unescape(m[2]),
        "uid": int(m[3]),
        "pid": int(m[4]),
        "aid": aid,
        "verdict": m[6],
        "detail": detail,
    }


@pytest.fixture
def audit_to_file(tmp_path: Path) -> Iterator[Callable[[], list[str]]]:
    """Records go to a real file; the fixture's value reads back its lines once flushed."""
    logger = logging.getLogger(audit.LOGGER)
    before = logger.level
    logger.setLevel(logging.INFO)
    with (tmp_path / "audit.log").open("w+") as sink:
        audit.to_stream(sink)

        def lines() -> list[str]:
            assert audit.flush()
            sink.seek(0)
            text = sink.read()
            assert text.endswith("\n")
            return text[:-1].split("\n")  # every "\n" ends a line: nothing else splits here

        try:
            yield lines
        finally:
            audit.to_stream(None)
            audit.stop()
            logger.setLevel(before)


UNTRUSTED = [
    # (syscall, aid, detail): what callers choose, with every way to break a line or a field.
    (f"x\n{FORGED}", None, ""),
    ("storage.search", None, f"invalid params: metadata.k\n{FORGED}\n.str: Input should be"),
    ("storage.search", None, f"carriage\r{FORGED}\r\n(nested) ) verdict=ok"),
    (f"a b uid=0 pid=1 aid=- verdict=ok{FORGED}", "agent 1\n" + FORGED, "tab\there"),
    ("sep\u2028line\u2029para\x85nel\x0bvt\x0cff\x1b[2Kesc\x7fdel", "\u00a0", "\u2028" + FORGED),
    ('back\\slash "quoted" \\n', "-", "\\n is two characters here, \\x0a too"),
    ("", "", "\udc80 lone surrogate"),
]


def test_untrusted_strings_never_forge_a_record_on_a_stream(
    audit_to_file: Callable[[], list[str]],
) -> None:
    for syscall, aid, detail in UNTRUSTED:
        audit.record(1000, 42, aid, syscall, "invalid", detail)
    lines = audit_to_file()
    assert len(lines) == len(UNTRUSTED), lines  # one line per record, whatever they carried
    for line, (syscall, aid, detail) in zip(lines, UNTRUSTED, strict=True):
        assert line.isprintable(), line  # no control character, no line or paragraph separator
        fields = parse(line)
        assert fields == {
            "syscall": syscall,
            "uid": 1000,
            "pid": 42,
            "aid": aid or None,
            "verdict": "invalid",
            "detail": detail,
        }, line


def test_the_escaped_form_is_the_documented_one(audit_to_file: Callable[[], list[str]]) -> None:
    audit.record(7, 8, None, "system.status", "ok", "")
    audit.record(7, 8, "a\\b c", "x\ny", "unknown", 'no\tsuch "thing" (really)\x00')
    audit.record(7, 8, "-", "", "unknown", "\u2028")
    lines = audit_to_file()
    prefix = f"aiosd[{os.getpid()}]: INFO aiosd.audit: "
    assert lines == [
        f"{prefix}system.status uid=7 pid=8 aid=- verdict=ok",
        rf'{prefix}x\ny uid=7 pid=8 aid=a\\b\x20c verdict=unknown (no\tsuch "thing" (really)\x00)',
        rf'{prefix}"" uid=7 pid=8 aid=\x2d verdict=unknown (\u2028)',
    ]


def test_under_journald_the_fields_carry_the_data_and_the_message_is_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import systemd.journal

    sent: list[dict[str, object]] = []

    def send(message: str, **fields: object) -> None:
        """What the records hand to systemd.journal.send, kept instead of sent."""
        sent.append({"MESSAGE": message, **fields})

    monkeypatch.setattr(systemd.journal, "send", send)
    logger = logging.getLogger(audit.LOGGER)
    before = logger.level
    logger.setLevel(logging.INFO)
    audit.to_journal()
    try:
        for syscall, aid, detail in UNTRUSTED:
            audit.record(1000, 42, aid, syscall, "invalid", detail)
        assert audit.flush()
    finally:
        audit.to_stream(None)
        audit.stop()
        logger.setLevel(before)
    assert len(sent) == len(UNTRUSTED)
    for fields, (syscall, aid, detail) in zip(sent, UNTRUSTED, strict=True):
        message = fields["MESSAGE"]
        assert isinstance(message, str) and message.isprintable(), message
        # The message reads as the stream's line does (without the stream's prefix) ...
        assert parse(f"aiosd[1]: INFO aiosd.audit: {message}") == {
            "syscall": syscall,
            "uid": 1000,
            "pid": 42,
            "aid": aid or None,
            "verdict": "invalid",
            "detail": detail,
        }
        # ... and the fields carry the caller's strings exactly as they came.
        assert fields["AIOS_SYSCALL"] == syscall
        assert fields["AIOS_AID"] == (aid or "")
        assert fields.get("AIOS_DETAIL", "") == detail  # sent when there is one
        assert fields["AIOS_UID"] == 1000 and fields["AIOS_PID"] == 42
        assert fields["AIOS_VERDICT"] == "invalid"
        assert fields["MESSAGE_ID"] == audit.MESSAGE_ID


# --- the daemon's other log lines ---------------------------------------------------------------


#: The daemon's format of a log line on stderr (aiosd/daemon.py).
STREAM_FORMAT = "aiosd[%(process)d]: %(levelname)s %(name)s: %(message)s"


def _one_line_log(sink: IO[str]) -> logging.Logger:
    logger = logging.getLogger("aiosd.test.oneline")
    handler = logging.StreamHandler(sink)
    handler.setFormatter(audit.OneLineFormatter(STREAM_FORMAT))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_ordinary_log_lines_quoting_callers_stay_one_line(tmp_path: Path) -> None:
    with (tmp_path / "daemon.log").open("w+") as sink:
        logger = _one_line_log(sink)
        try:
            logger.error("request %r (%s) failed", f"id\n{FORGED}", f"m\n{FORGED}")
            try:
                raise ValueError(f"bad key 'k\n{FORGED}'")
            except ValueError as exc:
                logger.error("syscall %s failed unexpectedly", "storage.put", exc_info=exc)
            logger.warning("user %s:\r%s\u2028%s", "evil\x1b[2K", FORGED, FORGED)
        finally:
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True
        sink.seek(0)
        lines = sink.read().splitlines()
    assert len(lines) == 3, lines
    for line in lines:
        assert line.isprintable(), line
        assert line.startswith(f"aiosd[{os.getpid()}]: "), line
        assert parse(line) is None, line  # none of them reads as an audit record
    assert "Traceback" in lines[1] and "ValueError: bad key" in lines[1]  # kept, on its line
    assert lines[2].endswith(f"user evil\\x1b[2K:\\r{FORGED}\\u2028{FORGED}")


def test_the_daemon_log_keeps_every_record_on_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiosd import daemon
    from aiosd.config import Config

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    with (tmp_path / "stderr").open("w+") as stderr:
        monkeypatch.setattr("sys.stderr", stderr)
        daemon.setup_logging(Config.model_validate({"daemon": {"log_target": "stderr"}}), None)
        try:
            logging.getLogger("aiosd.api.socket.server").error(
                "request %r (%s) failed", 1, f"x\n{FORGED}"
            )
        finally:
            for handler in list(root.handlers):
                root.removeHandler(handler)
            for handler in handlers:
                root.addHandler(handler)
            root.setLevel(level)
            audit.to_stream(None)
        stderr.seek(0)
        lines = stderr.read().splitlines()
    assert len(lines) == 1, lines
    assert parse(lines[0]) is None, lines

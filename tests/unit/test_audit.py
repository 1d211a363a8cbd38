"""Audit records under journald: structured fields through the real sd_journal_send."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

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

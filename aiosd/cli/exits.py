"""aiosctl's exit statuses (aiosctl(1), EXIT STATUS), and the status of each daemon error."""

from __future__ import annotations

from aiosd.errors import AiosError, Busy, InvalidParams, PermissionDenied
from aiosd.sdk.client import DaemonUnreachable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_DATAERR = 65  # the daemon rejected the request's parameters
EXIT_UNAVAILABLE = 69  # the daemon cannot be reached
EXIT_TEMPFAIL = 75  # the daemon is busy (queue full), or agent wait --timeout passed
EXIT_NOPERM = 77  # permission denied
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): 128 + 2, as a shell reports it

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_FAILURE: "the daemon returned an error",
    EXIT_USAGE: "usage error",
    EXIT_DATAERR: "invalid parameters",
    EXIT_UNAVAILABLE: "the daemon cannot be reached",
    EXIT_TEMPFAIL: "the daemon is busy, or 'agent wait --timeout' ran out; try again later",
    EXIT_NOPERM: "permission denied",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}


def status_of(exc: AiosError | DaemonUnreachable) -> int:
    """The exit status for an error of the daemon (or for not reaching it)."""
    if isinstance(exc, DaemonUnreachable):
        return EXIT_UNAVAILABLE
    if isinstance(exc, PermissionDenied):
        return EXIT_NOPERM
    if isinstance(exc, Busy):
        return EXIT_TEMPFAIL
    if isinstance(exc, InvalidParams):
        return EXIT_DATAERR
    return EXIT_FAILURE

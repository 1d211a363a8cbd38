"""Autouse fixtures after Home Assistant's ``verify_cleanup``: a test fails when it leaves
threads or asyncio tasks behind, or blocks an event loop it runs.

What is checked, for every test of the suite:

* **threads** — every thread alive at the end of the test that was not alive at its start
  (threads of session and module fixtures are, so they are allowed) gets a short grace to
  end; one still running after it fails the test, with its stack.
* **tasks and timers** — every event loop the test creates comes from a tracking policy;
  tasks still pending when the loop's work ends (``asyncio.run`` returning, which would
  cancel them silently, or ``loop.close()``), timers never cancelled, and loops never
  closed fail the test, with the task's await stack.
* **a blocked loop** — every callback run by any event loop in this process is timed; one
  that kept its loop for longer than 50 ms (``@pytest.mark.loop_block_limit(seconds)``
  raises that for a test that blocks on purpose) fails the test, with a stack sampled
  while it was blocking.  Time the thread waited for a CPU, and garbage-collector pauses
  (which stop every thread), are not counted as the callback's.

Failures are raised in this fixture's teardown (as Home Assistant's are), after every other
function-scoped fixture of the test has been torn down, so what those fixtures clean up is
not counted.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import asyncio.runners
import contextlib
import gc
import io
import os
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from aiosd.managers import audit

#: A callback holding its loop longer than this fails the test (seconds).
LOOP_BLOCK_LIMIT = 0.05
#: How long a thread the test started may take to end after the test (seconds, all threads).
THREAD_GRACE = 1.0
#: How often the watchdog looks for a callback over its limit, to sample its stack (seconds).
SAMPLE_EVERY = 0.01
MARKER = "loop_block_limit"
#: Blocks reported in full per test (each with a stack); more are only counted.
MAX_BLOCKS = 5


@dataclass
class Findings:
    """Everything one test left behind or blocked, collected while it runs."""

    limit: float
    lingering: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    more_blocks: int = 0  # blocks beyond MAX_BLOCKS, counted only
    loops: weakref.WeakSet[asyncio.AbstractEventLoop] = field(default_factory=weakref.WeakSet)


#: The running test's findings; None between tests (fixtures of wider scope are not checked).
_current: Findings | None = None


# --- tasks and timers ------------------------------------------------------------------------


def _task_report(task: asyncio.Task[Any]) -> str:
    buf = io.StringIO()
    task.print_stack(limit=12, file=buf)
    return f"{task!r}\n{buf.getvalue()}"


def _pending_tasks(loop: asyncio.AbstractEventLoop) -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks(loop) if not t.done()}


def _live_timers(loop: asyncio.AbstractEventLoop) -> list[asyncio.TimerHandle]:
    # A cancelled timer stays in the heap until the loop next runs: only live ones count.
    scheduled: list[asyncio.TimerHandle] = getattr(loop, "_scheduled", [])
    return [h for h in scheduled if not h.cancelled()]


def _check_leftovers(loop: asyncio.AbstractEventLoop, when: str, timers: bool = True) -> None:
    findings = _current
    if findings is None:
        return
    for task in _pending_tasks(loop):
        report = _task_report(task)
        finalized = getattr(loop, "finalized", [])
        if type(task.get_coro()).__name__ == "async_generator_athrow" and finalized:
            # Not the test's own task: asyncio's, closing a generator nobody closed.
            report += (
                "  it closes an async generator garbage-collected without aclose(), one of: "
                + "; ".join(finalized)
                + "\n"
            )
        findings.lingering.append(f"task still pending {when}: {report}")
    for timer in _live_timers(loop) if timers else ():
        findings.lingering.append(f"timer never cancelled, {when}: {timer!r}")


class TrackedEventLoop(asyncio.SelectorEventLoop):
    """The default loop, remembered by the running test and checked when it is closed."""

    def __init__(self) -> None:
        super().__init__()
        #: Async generators garbage-collected unclosed: the loop closes them in a task.
        self.finalized: list[str] = []
        if _current is not None:
            _current.loops.add(self)

    def _asyncgen_finalizer_hook(self, agen: Any) -> None:
        # The task this schedules runs ``agen.aclose()``, and its repr cannot name ``agen``:
        # remember which generator it was, for the report of a task still pending.
        frame = agen.ag_frame
        where = f" suspended at {frame.f_code.co_filename}:{frame.f_lineno}" if frame else ""
        self.finalized.append(f"{agen.__qualname__}{where}")
        super()._asyncgen_finalizer_hook(agen)  # type: ignore[misc]

    def close(self) -> None:
        """Record what is still pending, then close."""
        if not self.is_closed() and not self.is_running():
            _check_leftovers(self, "when its loop was closed")
        super().close()


class TrackingPolicy(asyncio.DefaultEventLoopPolicy):
    """Every ``asyncio.run`` and ``asyncio.new_event_loop`` makes a :class:`TrackedEventLoop`."""

    _loop_factory = TrackedEventLoop


_original_cancel_all = asyncio.runners._cancel_all_tasks  # type: ignore[attr-defined]


def _cancel_all_tasks(loop: asyncio.AbstractEventLoop) -> None:
    # asyncio.run cancels whatever its main coroutine left running, which hides the leak:
    # record it first. (Runner.close looks this name up in its module at each call.)
    # Timers are looked at when the loop closes, right after this: reported once.
    _check_leftovers(loop, "when asyncio.run's main coroutine returned", timers=False)
    _original_cancel_all(loop)


# --- a blocked loop ----------------------------------------------------------------------------


class _SchedStat:
    """This thread's time spent waiting for a CPU (``/proc/thread-self/schedstat``).

    On a loaded machine a callback may be descheduled for tens of milliseconds without
    blocking anything itself; that wait is subtracted, so only time the callback really
    held its loop (running, or sleeping in a call that blocks) counts.
    """

    def __init__(self) -> None:
        try:
            self.fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self.fd = None

    def run_delay(self) -> float:
        """Seconds this thread has waited on a run queue so far (0 where unknown)."""
        if self.fd is None:
            return 0.0
        try:
            return int(os.pread(self.fd, 96, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def __del__(self) -> None:
        # Dropped with its thread's threading.local, when the thread ends.
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)


class _Running:
    """The callback a loop thread is running now (read by the watchdog)."""

    __slots__ = ("handle", "start", "delay", "stack")

    def __init__(self, handle: asyncio.Handle, start: float, delay: float) -> None:
        self.handle = handle
        self.start = start
        self.delay = delay
        self.stack: str | None = None


_local = threading.local()
_running: dict[int, _Running] = {}
_original_run = asyncio.events.Handle._run


def _describe(handle: asyncio.Handle) -> str:
    callback = getattr(handle, "_callback", None)
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):  # a task step: the task says which coroutine, where
        return repr(owner)
    return repr(handle)


#: Seconds spent in the garbage collector so far (kept by :func:`_gc_clock`): a collection
#: pauses every thread, so it is the interpreter's pause, not the callback's block.
_gc_spent = 0.0
_gc_started = 0.0


def _gc_clock(phase: str, info: dict[str, int]) -> None:
    global _gc_spent, _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        _gc_spent += time.perf_counter() - _gc_started


def _timed_run(self: asyncio.Handle) -> None:
    findings = _current
    if findings is None:
        _original_run(self)
        return
    stat: _SchedStat | None = getattr(_local, "stat", None)
    if stat is None:
        stat = _local.stat = _SchedStat()
    tid = threading.get_ident()
    running = _Running(self, time.perf_counter(), stat.run_delay())
    gc_before = _gc_spent
    _running[tid] = running
    try:
        _original_run(self)
    finally:
        _running.pop(tid, None)
        wall = time.perf_counter() - running.start
        if wall > findings.limit:
            held = wall - (stat.run_delay() - running.delay) - (_gc_spent - gc_before)
            if held > findings.limit and len(findings.blocks) >= MAX_BLOCKS:
                findings.more_blocks += 1
            elif held > findings.limit:
                where = running.stack or "(no stack sampled: it held the GIL throughout)\n"
                findings.blocks.append(
                    f"{_describe(self)} held its loop for {held * 1000:.0f} ms "
                    f"({wall * 1000:.0f} ms wall), over the {findings.limit * 1000:.0f} ms "
                    f"limit; sampled while blocking:\n{where}"
                )


def _callback_stack(frame: Any) -> str:
    """The stack of a running callback, from the callback down (the loop's frames omitted)."""
    frames = traceback.extract_stack(frame)
    # Everything up to asyncio's Handle._run (and our wrapper) is pytest and the loop.
    starts = [i for i, f in enumerate(frames) if f.filename == _EVENTS_FILE and f.name == "_run"]
    return "".join(traceback.format_list(frames[starts[-1] + 1 :] if starts else frames[-15:]))


_EVENTS_FILE = asyncio.events.__file__


def _watch(stop: threading.Event) -> None:
    """Sample the stack of any callback over its limit, while it still blocks."""
    while not stop.wait(SAMPLE_EVERY):
        findings = _current
        if findings is None:
            continue
        now = time.perf_counter()
        for tid, running in list(_running.items()):
            if running.stack is None and now - running.start > findings.limit:
                frame = sys._current_frames().get(tid)
                if frame is not None and _running.get(tid) is running:
                    running.stack = _callback_stack(frame)


@pytest.fixture(scope="session", autouse=True)
def _cleanup_instruments() -> Iterator[None]:
    """Install the loop policy, the callback timer and the stack watchdog for the session."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(TrackingPolicy())
    asyncio.runners._cancel_all_tasks = _cancel_all_tasks  # type: ignore[attr-defined]
    asyncio.events.Handle._run = _timed_run  # type: ignore[method-assign]
    gc.callbacks.append(_gc_clock)
    stop = threading.Event()
    # Started before any test's snapshot of threads, so it is never counted as left behind.
    watchdog = threading.Thread(
        target=_watch, args=(stop,), name="cleanup-loop-watchdog", daemon=True
    )
    watchdog.start()
    try:
        yield
    finally:
        stop.set()
        watchdog.join()
        gc.callbacks.remove(_gc_clock)
        asyncio.events.Handle._run = _original_run  # type: ignore[method-assign]
        asyncio.runners._cancel_all_tasks = _original_cancel_all  # type: ignore[attr-defined]
        asyncio.set_event_loop_policy(previous)


# --- threads ---------------------------------------------------------------------------------


def _thread_report(thread: threading.Thread) -> str:
    kind = "daemon" if thread.daemon else "non-daemon"
    target = getattr(thread, "_target", None)  # what was started, when it is a plain Thread
    started = f" (target {target!r})" if target is not None else ""
    frame = sys._current_frames().get(thread.ident or -1)
    frames = traceback.extract_stack(frame) if frame is not None else []
    # threading's own bootstrap frames say nothing about who left the thread running.
    frames = [f for f in frames if f.filename != threading.__file__]
    stack = "".join(traceback.format_list(frames[-12:]))
    return f"{kind} thread {thread.name!r}{started} still running:\n{stack}"


def _lingering_threads(before: frozenset[threading.Thread]) -> list[threading.Thread]:
    new = [
        t
        for t in threading.enumerate()
        # A _DummyThread is a foreign (C) thread that once called into Python: not ours.
        if t not in before and not isinstance(t, threading._DummyThread)
    ]
    deadline = time.monotonic() + THREAD_GRACE
    for thread in new:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in new if t.is_alive()]


# --- the check ---------------------------------------------------------------------------------


def _limit(request: pytest.FixtureRequest) -> float:
    marker = request.node.get_closest_marker(MARKER)
    if marker is None:
        return LOOP_BLOCK_LIMIT
    seconds = marker.args[0] if marker.args else marker.kwargs.get("seconds")
    if not isinstance(seconds, int | float) or seconds <= 0:
        raise pytest.UsageError(f"@pytest.mark.{MARKER} needs a positive number of seconds")
    return float(seconds)


@pytest.fixture(autouse=True)
def verify_cleanup(request: pytest.FixtureRequest, _cleanup_instruments: None) -> Iterator[None]:
    """Fail the test if it left threads, tasks, timers or open loops behind, or blocked a loop."""
    global _current
    findings = Findings(limit=_limit(request))
    threads_before = frozenset(threading.enumerate())
    _current = findings
    try:
        yield
    finally:
        for loop in list(findings.loops):
            if not loop.is_closed():
                findings.lingering.append(f"event loop never closed: {loop!r}")
                _check_leftovers(loop, "with its loop never closed")
        _current = None
    problems = [*findings.lingering, *findings.blocks]
    if findings.more_blocks:
        problems.append(f"... and {findings.more_blocks} more callbacks over the limit")
    # The audit writer is the process's own service, not the test's: it idles for a second
    # after its last record, so end it (a no-op when none runs) before looking at threads.
    audit.stop()
    problems += [_thread_report(t) for t in _lingering_threads(threads_before)]
    if problems:
        pytest.fail(
            f"{request.node.nodeid} did not clean up after itself:\n\n" + "\n".join(problems),
            pytrace=False,
        )

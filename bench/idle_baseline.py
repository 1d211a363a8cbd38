"""The ``idle`` baseline: a bare process doing only what the daemon must do to serve the model.

    python bench/idle_baseline.py SLOTS [MODEL_PATH]

Loads the default GGUF the way the daemon's embedded backend does with its default config
(SLOTS contexts of n_ctx 2048, cpu_count // SLOTS threads each);
SLOTS = 0 loads nothing (the Python interpreter's own floor).  Then sends READY=1 to
$NOTIFY_SOCKET and sleeps until SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any


def load(slots: int, path: str) -> list[Any]:
    """The objects the daemon keeps alive for its model."""
    if slots == 0:
        return []
    from llama_cpp import Llama

    threads = max(1, (os.cpu_count() or 1) // slots)
    return [
        Llama(
            model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        for _ in range(slots)
    ]


def main() -> None:
    """Load, notify, idle until SIGTERM."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # before llama.cpp starts threads
    keep = load(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "")
    addr = os.environ.get("NOTIFY_SOCKET")
    if addr:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", addr)
    signal.sigwait({signal.SIGTERM})
    del keep


if __name__ == "__main__":
    main()

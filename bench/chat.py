"""Timed ``llm.chat`` calls through the daemon, measured at the client (aiosd's AsyncClient)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiosd.sdk.client import AsyncClient


@dataclass(frozen=True)
class DaemonGeneration:
    """One generation as the client saw it."""

    tokens: int  # usage.completion_tokens of the final result
    ttft: float  # seconds from sending the request to the first stream notification
    total: float  # seconds from sending the request to the final response
    notes: int  # stream notifications received
    text: str
    server_ttft_ms: float | None  # the daemon's own timings.first_token_ms

    @property
    def tokens_per_s(self) -> float:
        """Completion tokens over the whole request time (time to first token included)."""
        return self.tokens / self.total


def chat_params(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """A greedy single-turn ``llm.chat``."""
    return {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
    }


async def timed_chat(
    path: Path, prompt: str, max_tokens: int, *, stream: bool = True
) -> DaemonGeneration:
    """One ``llm.chat`` on a fresh connection (connected before the clock starts)."""
    async with AsyncClient(path) as client:
        box: list[dict[str, Any]] = []
        first: float | None = None
        notes = 0
        t0 = time.perf_counter()
        async for _ in client.stream(
            "llm.chat", chat_params(prompt, max_tokens, stream), on_result=box.append
        ):
            if first is None:
                first = time.perf_counter()
            notes += 1
        end = time.perf_counter()
    result = box[0]
    return DaemonGeneration(
        tokens=int(result["usage"]["completion_tokens"]),
        ttft=(first or end) - t0,
        total=end - t0,
        notes=notes,
        text=str(result["message"]["content"]),
        server_ttft_ms=result["timings"]["first_token_ms"],
    )

"""Python SDK for agents and apps talking to aiosd."""

from __future__ import annotations

from aiosd.errors import AiosError
from aiosd.sdk.agent import Agent, Identity, Memory, Reply
from aiosd.sdk.client import AsyncClient, Client, DaemonUnreachable, default_socket

__all__ = [
    "Agent",
    "AiosError",
    "AsyncClient",
    "Client",
    "DaemonUnreachable",
    "Identity",
    "Memory",
    "Reply",
    "default_socket",
]

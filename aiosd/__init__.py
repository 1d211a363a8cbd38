"""aiosd — an LLM agent operating system as a Linux system daemon."""

from __future__ import annotations

__version__ = "0.1.0"

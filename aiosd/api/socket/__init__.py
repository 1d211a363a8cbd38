"""The Unix-socket JSON-RPC 2.0 front-end."""

from __future__ import annotations

#: The method of the notifications that carry a streaming request's pieces.
STREAM_METHOD = "stream"

"""Tokenizer time is not one user's to take (issue 9, finding 6)."""

from __future__ import annotations

from tests.support import Daemon, RawClient


def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing(daemon: Daemon) -> None:
    c = RawClient(daemon.socket_path)
    huge = "lighthouse " * 90_000  # ~1 MB: tokenizing it took the shared tokenizer ~0.5 s
    replies = []
    for req_id in range(8):
        c.send(
            {
                "jsonrpc": "2.0",
                "id": req_id,
                "method": "llm.chat",
                "params": {"messages": [{"role": "user", "content": huge}]},
            }
        )
    for _ in range(8):
        replies.append(c.recv())
    # Refused from its size alone: the count is a lower bound, said so, and no tokenizing.
    for reply in replies:
        err = reply["error"]
        assert err["data"]["at_least"] is True, err
        assert "at least" in err["message"] and err["data"]["context_length"] == 2048
    # Someone's short chat meanwhile is served as usual.
    short = c.call("llm.chat", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert "result" in short, short
    c.close()

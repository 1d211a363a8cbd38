"""Storage through the real daemon's socket, with real Unix users: isolation, versions,
quotas, sharing, bad input."""

from __future__ import annotations

import base64
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHARE_GROUP, UnixUser, run_as
from tests.support import Daemon, RawClient, write_config

pytestmark = pytest.mark.e2e

CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect({path!r})
f = s.makefile("rb")
out = []
for i, (method, params) in enumerate(json.loads(sys.stdin.read())):
    s.sendall(json.dumps({{"jsonrpc": "2.0", "id": i, "method": method,
                          "params": params}}).encode() + b"\\n")
    while True:
        msg = json.loads(f.readline())
        if msg.get("id") == i:
            out.append(msg)
            break
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def store_daemon() -> Iterator[Daemon]:
    """A daemon with small quotas, its socket reachable by the test users."""
    directory = Path(tempfile.mkdtemp(prefix="aiosd-storage-"))
    directory.chmod(0o755)
    extra = "\n[storage]\nquota_bytes = 200000\nquota_entries = 50\nretention = 20\n"
    d = Daemon(directory, write_config(directory, extra=extra, slots=1))
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0, d.log()


def as_user(user: UnixUser, daemon: Daemon, *calls: tuple[str, dict[str, Any]]) -> list[dict]:
    """Make the calls as ``user`` on one connection; return the replies."""
    script = CLIENT.format(path=str(daemon.socket_path))
    out = run_as(user, script, stdin=json.dumps(list(calls)))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert "result" in reply, reply
    return reply["result"]  # type: ignore[no-any-return]


def err(reply: dict[str, Any], code: int) -> dict[str, Any]:
    assert "error" in reply, reply
    assert reply["error"]["code"] == code, reply
    return reply["error"]  # type: ignore[no-any-return]


NOT_FOUND, INVALID, QUOTA, DENIED = -32012, -32602, -32013, -32001


def test_users_cannot_reach_each_others_data(
    unix_users: dict[str, UnixUser], store_daemon: Daemon
) -> None:
    a, b = unix_users["in"], unix_users["in2"]
    ok(
        as_user(
            a,
            store_daemon,
            (
                "storage.put",
                {
                    "collection": "diary",
                    "key": "day1",
                    "value": "secret pelican plans",
                    "metadata": {"mood": "sly"},
                },
            ),
        )[0]
    )
    replies = as_user(
        b,
        store_daemon,
        ("storage.get", {"collection": "diary", "key": "day1"}),
        ("storage.get", {"collection": "diary", "key": "day1", "owner": a.uid}),
        ("storage.get", {"collection": "diary", "key": "day1", "owner": a.name}),
        ("storage.list", {"collection": "diary"}),
        ("storage.list", {"collection": "diary", "owner": a.uid}),
        ("storage.search", {"query": "pelican"}),
        ("storage.search", {"query": "pelican", "collection": "diary", "owner": a.uid}),
        ("storage.history", {"collection": "diary", "key": "day1"}),
        ("storage.history", {"collection": "diary", "key": "day1", "owner": a.uid}),
        ("storage.delete", {"collection": "diary", "key": "day1"}),
        ("storage.rollback", {"collection": "diary", "key": "day1", "version": 1}),
        ("storage.get", {"collection": "nothing-here", "key": "x", "owner": a.uid}),
    )
    err(replies[0], NOT_FOUND)
    err(replies[1], NOT_FOUND)
    err(replies[2], NOT_FOUND)
    assert ok(replies[3])["entries"] == []
    err(replies[4], NOT_FOUND)
    assert ok(replies[5])["hits"] == []
    err(replies[6], NOT_FOUND)
    err(replies[7], NOT_FOUND)
    err(replies[8], NOT_FOUND)
    err(replies[9], NOT_FOUND)
    err(replies[10], NOT_FOUND)
    # An existing but unshared collection and a missing one look exactly alike.
    assert replies[1]["error"]["message"].replace("diary", "X") == replies[11]["error"][
        "message"
    ].replace("nothing-here", "X")
    for r in replies:
        if "error" in r:
            assert r["error"]["code"] != DENIED
    # and the owner still has it, unchanged
    got = ok(as_user(a, store_daemon, ("storage.get", {"collection": "diary", "key": "day1"}))[0])
    assert got["value"] == "secret pelican plans" and got["version"] == 1


def test_thirty_puts_keep_twenty_and_rollback_restores_bytes(
    unix_users: dict[str, UnixUser], store_daemon: Daemon
) -> None:
    user = unix_users["in"]
    blobs = [bytes([i]) * 7 + b"\x00\xff" + bytes(range(i)) for i in range(1, 31)]
    puts = [
        (
            "storage.put",
            {
                "collection": "blobs",
                "key": "k",
                "encoding": "base64",
                "value": base64.b64encode(b).decode(),
            },
        )
        for b in blobs
    ]
    replies = as_user(
        user, store_daemon, *puts, ("storage.history", {"collection": "blobs", "key": "k"})
    )
    assert [ok(r)["version"] for r in replies[:30]] == list(range(1, 31))
    versions = ok(replies[30])["versions"]
    assert [v["version"] for v in versions] == list(range(11, 31))
    assert all(v["size"] == len(blobs[v["version"] - 1]) for v in versions)
    fifth_kept = versions[4]["version"]  # version 15
    replies = as_user(
        user,
        store_daemon,
        ("storage.rollback", {"collection": "blobs", "key": "k", "version": fifth_kept}),
        ("storage.get", {"collection": "blobs", "key": "k"}),
        ("storage.history", {"collection": "blobs", "key": "k"}),
        ("storage.get", {"collection": "blobs", "key": "k", "version": 5}),
    )
    rb = ok(replies[0])
    assert rb["version"] == 31 and rb["from_version"] == fifth_kept
    got = ok(replies[1])
    assert got["encoding"] == "base64" and got["version"] == 31
    assert base64.b64decode(got["value"]) == blobs[fifth_kept - 1]
    assert [v["version"] for v in ok(replies[2])["versions"]] == list(range(12, 32))
    err(replies[3], NOT_FOUND)  # pruned long ago


def test_put_over_quota_fails_and_changes_nothing(
    unix_users: dict[str, UnixUser], store_daemon: Daemon
) -> None:
    user = unix_users["in2"]
    replies = as_user(
        user,
        store_daemon,
        # 50000 bytes of text cost about 150000: the value, and the search index's copy of
        # the current version, which counts twice (its text and its word index).
        ("storage.put", {"collection": "big", "key": "a", "value": "x" * 50000}),
        ("storage.usage", {}),
        ("storage.put", {"collection": "big", "key": "b", "value": "y" * 60000}),
        ("storage.usage", {}),
        ("storage.list", {"collection": "big"}),
        ("storage.search", {"query": "yyyy"}),
    )
    ok(replies[0])
    before = ok(replies[1])
    e = err(replies[2], QUOTA)
    assert "200000" in e["message"] and str(before["used_bytes"]) in e["message"]
    assert e["data"]["quota_bytes"] == 200000 and e["data"]["used_bytes"] == before["used_bytes"]
    assert ok(replies[3]) == before
    assert [x["key"] for x in ok(replies[4])["entries"]] == ["a"]
    # an admin raises the quota, and the same put goes through
    admin = RawClient(store_daemon.socket_path)
    raised = admin.call("storage.set_quota", {"user": user.name, "quota_bytes": 400000})
    assert ok(raised)["quota_bytes"] == 400000
    admin.close()
    assert (
        ok(
            as_user(
                user,
                store_daemon,
                ("storage.put", {"collection": "big", "key": "b", "value": "y" * 60000}),
            )[0]
        )["version"]
        == 1
    )


def test_only_admins_set_quotas(unix_users: dict[str, UnixUser], store_daemon: Daemon) -> None:
    reply = as_user(
        unix_users["in"],
        store_daemon,
        ("storage.set_quota", {"user": unix_users["in"].uid, "quota_bytes": 10**12}),
    )[0]
    err(reply, DENIED)


def test_sharing_through_a_group_and_revoking_it(
    unix_users: dict[str, UnixUser], store_daemon: Daemon
) -> None:
    owner, reader, outsider = unix_users["in"], unix_users["in2"], unix_users["out"]
    read = ("storage.get", {"collection": "recipes", "key": "soup", "owner": owner.uid})
    replies = as_user(
        owner,
        store_daemon,
        ("storage.put", {"collection": "recipes", "key": "soup", "value": "leek and potato"}),
        ("storage.share", {"collection": "recipes", "group": SHARE_GROUP}),
        ("storage.share", {"collection": "recipes", "group": "root"}),
    )
    ok(replies[0])
    assert ok(replies[1])["shares"][0]["group"] == SHARE_GROUP
    err(replies[2], DENIED)  # not a group the owner belongs to
    got = as_user(
        reader,
        store_daemon,
        read,
        ("storage.search", {"query": "leek", "collection": "recipes", "owner": owner.name}),
        ("storage.put", {"collection": "recipes", "key": "soup", "value": "mine"}),
    )
    assert ok(got[0])["value"] == "leek and potato"
    assert [h["key"] for h in ok(got[1])["hits"]] == ["soup"]
    assert ok(got[2])["version"] == 1  # writes go to the reader's own store, not the owner's
    assert as_user(outsider, store_daemon, read)[0]["error"]["code"] == DENIED  # no role at all
    assert (
        ok(
            as_user(
                owner,
                store_daemon,
                ("storage.unshare", {"collection": "recipes", "group": SHARE_GROUP}),
            )[0]
        )["shares"]
        == []
    )
    err(as_user(reader, store_daemon, read)[0], NOT_FOUND)
    assert (
        ok(
            as_user(owner, store_daemon, ("storage.get", {"collection": "recipes", "key": "soup"}))[
                0
            ]
        )["value"]
        == "leek and potato"
    )


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"collection": "a/b", "key": "k", "value": "v"}, "collection"),
        ({"collection": "a\x00b", "key": "k", "value": "v"}, "collection"),
        ({"collection": "_memory.x", "key": "k", "value": "v"}, "collection"),
        ({"collection": "c", "key": "k" * 1025, "value": "v"}, "key"),
        ({"collection": "c", "key": "a\x00", "value": "v"}, "key"),
        ({"collection": "c", "key": "k", "value": "!!!", "encoding": "base64"}, "value"),
        ({"collection": "c", "key": "k", "value": "v", "encoding": "rot13"}, "encoding"),
    ],
)
def test_bad_put_input_is_named_and_changes_nothing(
    unix_users: dict[str, UnixUser], store_daemon: Daemon, params: dict[str, Any], field: str
) -> None:
    user = unix_users["in2"]
    replies = as_user(
        user, store_daemon, ("storage.usage", {}), ("storage.put", params), ("storage.usage", {})
    )
    e = err(replies[1], INVALID)
    assert field in e["message"]
    assert ok(replies[0]) == ok(replies[2])


def test_bad_versions_and_value_size(unix_users: dict[str, UnixUser], store_daemon: Daemon) -> None:
    user = unix_users["in2"]
    replies = as_user(
        user,
        store_daemon,
        ("storage.get", {"collection": "c", "key": "k", "version": -1}),
        ("storage.get", {"collection": "c", "key": "k", "version": 0}),
        ("storage.rollback", {"collection": "c", "key": "k", "version": -5}),
        ("storage.rollback", {"collection": "c", "key": "k"}),
        ("storage.search", {"query": "   "}),
        ("storage.list", {"collection": "c", "limit": 0}),
    )
    assert "version" in err(replies[0], INVALID)["message"]
    assert "version" in err(replies[1], INVALID)["message"]
    assert "version" in err(replies[2], INVALID)["message"]
    assert "exactly one of version and at" in err(replies[3], INVALID)["message"]
    assert "query" in err(replies[4], INVALID)["message"]
    assert "limit" in err(replies[5], INVALID)["message"]


def test_search_ranks_by_bm25_filters_metadata_and_pages(
    unix_users: dict[str, UnixUser], store_daemon: Daemon
) -> None:
    user = unix_users["in"]
    docs = {
        "a": ("the lighthouse keeper logs the storm", {"kind": "log"}),
        "b": ("storm storm storm at the lighthouse", {"kind": "log"}),
        "c": ("a quiet day with no weather at all", {"kind": "note"}),
        "d": ("notes about the storm drain", {"kind": "note"}),
        # Member names a JSON path would read as syntax are matched as they are.
        "e": ("storm in a teacup", {'say "hi"': "yes", "a.b": 1, "[0]": True}),
    }
    as_user(
        user,
        store_daemon,
        *[
            ("storage.put", {"collection": "sea", "key": k, "value": v, "metadata": m})
            for k, (v, m) in docs.items()
        ],
    )
    replies = as_user(
        user,
        store_daemon,
        ("storage.search", {"query": "storm", "collection": "sea"}),
        ("storage.search", {"query": "storm", "collection": "sea", "metadata": {"kind": "note"}}),
        ("storage.search", {"query": "storm", "collection": "sea", "limit": 1, "offset": 1}),
        ("storage.search", {"query": "note", "collection": "sea"}),
        (
            "storage.search",
            {"query": "storm", "collection": "sea", "metadata": {'say "hi"': "yes"}},
        ),
        (
            "storage.search",
            {"query": "storm", "collection": "sea", "metadata": {"a.b": 1, "[0]": True}},
        ),
        ("storage.search", {"query": "storm", "collection": "sea", "metadata": {"say": "yes"}}),
    )
    assert [h["key"] for h in ok(replies[4])["hits"]] == ["e"]
    assert [h["key"] for h in ok(replies[5])["hits"]] == ["e"]
    assert ok(replies[6])["hits"] == []
    ranked = ok(replies[0])["hits"]
    hits = [h for h in ranked if h["key"] != "e"]
    assert [h["key"] for h in hits][0] == "b" and {h["key"] for h in hits} == {"a", "b", "d"}
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    assert "[storm]" in hits[0]["snippet"]
    assert [h["key"] for h in ok(replies[1])["hits"]] == ["d"]
    assert [h["key"] for h in ok(replies[2])["hits"]] == [ranked[1]["key"]]
    assert {h["key"] for h in ok(replies[3])["hits"]} == {"c", "d"}  # metadata is searched too


def test_list_pages_by_prefix(unix_users: dict[str, UnixUser], store_daemon: Daemon) -> None:
    user = unix_users["in2"]
    as_user(
        user,
        store_daemon,
        *[
            ("storage.put", {"collection": "pages", "key": f"p{i:02}", "value": str(i)})
            for i in range(7)
        ],
        ("storage.put", {"collection": "pages", "key": "q", "value": "other"}),
    )
    first, second = as_user(
        user,
        store_daemon,
        ("storage.list", {"collection": "pages", "prefix": "p", "limit": 4}),
        ("storage.list", {"collection": "pages", "prefix": "p", "limit": 4, "after": "p03"}),
    )
    assert [e["key"] for e in ok(first)["entries"]] == ["p00", "p01", "p02", "p03"]
    assert ok(first)["next"] == "p03"
    assert [e["key"] for e in ok(second)["entries"]] == ["p04", "p05", "p06"]
    assert ok(second)["next"] is None


def test_delete_keeps_history_and_rollback_restores(
    unix_users: dict[str, UnixUser], store_daemon: Daemon
) -> None:
    user = unix_users["in"]
    replies = as_user(
        user,
        store_daemon,
        ("storage.put", {"collection": "tmp", "key": "x", "value": "one"}),
        ("storage.delete", {"collection": "tmp", "key": "x"}),
        ("storage.get", {"collection": "tmp", "key": "x"}),
        ("storage.history", {"collection": "tmp", "key": "x"}),
        ("storage.rollback", {"collection": "tmp", "key": "x", "version": 1}),
        ("storage.get", {"collection": "tmp", "key": "x"}),
    )
    assert ok(replies[1])["version"] == 2
    err(replies[2], NOT_FOUND)
    assert [v["deleted"] for v in ok(replies[3])["versions"]] == [False, True]
    assert ok(replies[5])["value"] == "one" and ok(replies[5])["version"] == 3


def test_memory_of_one_user_is_invisible_to_another(
    unix_users: dict[str, UnixUser], store_daemon: Daemon
) -> None:
    a, b = unix_users["in"], unix_users["in2"]
    added = ok(
        as_user(
            a,
            store_daemon,
            ("memory.add", {"content": "the vault code is 4711", "space": "notes", "pinned": True}),
        )[0]
    )
    target = {"id": added["id"], "space": "notes"}
    replies = as_user(
        b,
        store_daemon,
        ("memory.get", target),
        ("memory.update", {**target, "content": "overwritten"}),
        ("memory.delete", target),
        ("memory.search", {"query": "vault", "space": "notes"}),
        ("memory.clear", {"space": "notes", "keep_pinned": False}),
        ("storage.search", {"query": "vault"}),
    )
    for r in replies[:3]:
        err(r, NOT_FOUND)
    assert ok(replies[3])["hits"] == []
    assert ok(replies[4])["removed"] == 0  # b's own (empty) space of that name
    assert ok(replies[5])["hits"] == []
    got = ok(as_user(a, store_daemon, ("memory.get", target))[0])
    assert got["content"] == "the vault code is 4711"


def test_metadata_and_key_names_count_against_the_quota(
    unix_users: dict[str, UnixUser], store_daemon: Daemon
) -> None:
    user = unix_users["in"]
    meta = {"blob": "y" * 40000}
    puts = [
        ("storage.put", {"collection": "meta", "key": f"k{i}", "value": "x", "metadata": meta})
        for i in range(10)
    ]
    replies = as_user(user, store_daemon, ("storage.usage", {}), *puts, ("storage.usage", {}))
    before, after = ok(replies[0]), ok(replies[-1])
    accepted = [r for r in replies[1:-1] if "result" in r]
    refused = [err(r, QUOTA) for r in replies[1:-1] if "error" in r]
    # Ten 1-byte values would fit many times over: their metadata is what fills the quota.
    assert accepted and refused
    assert refused[0]["data"]["exceeded"] == "bytes"
    assert after["used_bytes"] - before["used_bytes"] >= len(accepted) * 40000
    assert after["used_bytes"] <= after["quota_bytes"] == 200000
    # Long key names count too: 1000-byte keys with empty values cannot fill the entries quota.
    long_keys = [
        ("storage.put", {"collection": "names", "key": f"{i:03}" + "k" * 997, "value": ""})
        for i in range(50)
    ]
    replies = as_user(user, store_daemon, *long_keys, ("storage.usage", {}))
    assert any("error" in r and r["error"]["code"] == QUOTA for r in replies[:-1])
    assert ok(replies[-1])["used_bytes"] <= 200000
    # Purging what was stored gives every byte back (a refused put stored nothing).
    keys = [("meta", f"k{i}") for i in range(10)] + [("names", p["key"]) for _, p in long_keys]
    purges = [("storage.delete", {"collection": c, "key": k, "purge": True}) for c, k in keys]
    for reply in as_user(user, store_daemon, *purges):
        assert "result" in reply or reply["error"]["code"] == NOT_FOUND, reply
    assert ok(as_user(user, store_daemon, ("storage.usage", {}))[0]) == before

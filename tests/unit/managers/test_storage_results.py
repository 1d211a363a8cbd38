"""The store's results have exactly the keys and value types their TypedDicts declare, and
fit the ``storage.*`` syscalls' result models as they are."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pytest

from aiosd.kernel.families import storage as family
from aiosd.managers.storage import (
    Deletion,
    KeyHistory,
    KeyPage,
    Limits,
    RolledBack,
    SearchHit,
    ShareGrant,
    StoredValue,
    Usage,
    UserStore,
    Written,
)


def conforms(value: object, hint: Any) -> bool:
    """Whether ``value`` is of type ``hint`` (the forms the store's TypedDicts use)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(conforms(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(hint)
        return isinstance(value, dict) and all(
            conforms(a, k) and conforms(b, v) for a, b in value.items()
        )
    if typing.is_typeddict(hint):
        hints = typing.get_type_hints(hint)
        return (
            isinstance(value, dict)
            and set(value) == set(hints)
            and all(conforms(value[n], h) for n, h in hints.items())
        )
    return type(value) is hint  # exact: a bool is not an int here, an int not a float


@pytest.fixture
def store(tmp_path: Path) -> typing.Iterator[UserStore]:
    s = UserStore(tmp_path / "0.sqlite", 0, "normal", Limits(1 << 30, 1 << 20, 4))
    s.open()
    yield s
    s.close()


def test_every_result_has_exactly_its_declared_keys_and_types(store: UserStore) -> None:
    results: list[tuple[object, Any]] = [
        (store.put("c", "t", b"some text", True, {"n": 1, "tags": ["x"]}), Written),
        (store.put("c", "b", b"\x00\xff", False, {}), Written),
        (store.get("c", "t", None), StoredValue),
        (store.get("c", "b", 1), StoredValue),
        (store.list_keys("c", "", 1, None), KeyPage),
        (store.list_keys("c", "", 10, None), KeyPage),
        (store.delete("c", "b"), Deletion),
        (store.history("c", "b"), KeyHistory),
        (store.rollback("c", "b", 1, None), RolledBack),
        (store.search("text", ["c"], {}, 10, 0), list[SearchHit]),
        (store.usage(), Usage),
        (store.set_quota(1 << 20, None), Usage),
    ]
    store.share("c", 4242, "read")
    results.append((store.shares(), list[ShareGrant]))
    for value, hint in results:
        assert conforms(value, hint), (hint, value)
    assert store.search("text", ["c"], {}, 10, 0), "the search found nothing to check"


def test_results_fit_the_syscall_result_models(store: UserStore) -> None:
    # model_validate: pydantic's own check, keys exact (results forbid extra keys) and types.
    family.PutResult.model_validate(store.put("c", "k", b"v1", True, {}))
    family.PutResult.model_validate(store.rollback("c", "k", 1, None))
    family.ListResult.model_validate(store.list_keys("c", "", 10, None))
    family.HistoryResult.model_validate(store.history("c", "k"))
    family.DeleteResult.model_validate(store.delete("c", "k"))
    family.UsageResult.model_validate({"uid": 0, **store.usage()})
    family.UsageResult.model_validate({"uid": 0, **store.set_quota(None, 10)})
    store.put("c", "k", b"searchable words", True, {})
    hits = store.search("words", ["c"], {}, 10, 0)
    assert hits
    family.SearchResult.model_validate({"hits": hits})
    row = store.get("c", "k", None)
    assert isinstance(row["value"], bytes) and row["is_text"] is True
    fields = {k: v for k, v in row.items() if k not in ("value", "is_text")}
    family.GetResult.model_validate({**fields, "value": row["value"].decode(), "encoding": "text"})

"""The params rules shared by both transports (syscall_base.uncarriable), on every syscall."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from aiosd.kernel.dispatch import invalid_params
from aiosd.kernel.families.storage import GetParams, PutParams
from aiosd.kernel.syscall_base import MAX_METADATA_BYTES, MAX_NESTING, uncarriable
from aiosd.kernel.syscalls import SYSCALLS


def nested(levels: int) -> dict[str, Any]:
    """A metadata object with ``levels`` levels of objects, the outermost included."""
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def refusal(model: Any, data: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(ValidationError) as err:
        model.model_validate(data)
    first = invalid_params(err.value).data["errors"][0]
    return first["field"], first["message"]


PUT = {"collection": "c", "key": "k", "value": "v"}


@pytest.mark.parametrize(
    ("data", "field", "why"),
    [
        ({**PUT, "value": "a\x00b"}, "value", "NUL"),
        ({**PUT, "metadata": {"k": "\ud800"}}, "metadata.k", "lone surrogate"),
        ({**PUT, "metadata": {"\ud800": 1}}, "metadata.(name)", "lone surrogate"),
        ({**PUT, "metadata": {"x": float("nan")}}, "metadata.x", "not finite"),
        ({**PUT, "metadata": {"x": float("inf")}}, "metadata.x", "not finite"),
        ({**PUT, "metadata": {"x": 2**63}}, "metadata.x", "64-bit"),
        ({**PUT, "metadata": {"x": [-(2**63) - 1]}}, "metadata.x.0", "64-bit"),
        ({**PUT, "metadata": {"k" * 257: 1}}, "metadata", "member name longer"),
    ],
)
def test_what_a_transport_cannot_carry_is_refused_naming_the_field(
    data: dict[str, Any], field: str, why: str
) -> None:
    got_field, message = refusal(PutParams, data)
    assert got_field == field and why in message


def test_nesting_is_bounded_and_the_bound_itself_is_accepted() -> None:
    # The params object is one level, metadata the second.
    PutParams.model_validate({**PUT, "metadata": nested(MAX_NESTING - 1)})
    field, message = refusal(PutParams, {**PUT, "metadata": nested(MAX_NESTING)})
    assert field.startswith("metadata.a") and f"deeper than {MAX_NESTING}" in message
    # 256+ levels (which once stored fine and then failed every read) are refused too.
    assert "deeper" in refusal(PutParams, {**PUT, "metadata": nested(300)})[1]


def test_metadata_size_is_bounded_in_bytes() -> None:
    fits = {"x": "y" * (MAX_METADATA_BYTES - 16)}
    PutParams.model_validate({**PUT, "metadata": fits})
    field, message = refusal(PutParams, {**PUT, "metadata": {"x": "é" * MAX_METADATA_BYTES}})
    assert field == "metadata" and f"at most {MAX_METADATA_BYTES}" in message


def test_a_version_beyond_64_bits_never_reaches_sqlite() -> None:
    field, message = refusal(GetParams, {"collection": "c", "key": "k", "version": 2**63})
    assert field == "version" and "64-bit" in message


@pytest.mark.parametrize("name", sorted(SYSCALLS))
def test_every_syscall_refuses_nul_and_surrogates_in_any_field(name: str) -> None:
    model = SYSCALLS[name].params
    for bad in ("x\x00y", "x\udc80y"):
        for field in model.model_fields:
            with pytest.raises(ValidationError) as err:
                model.model_validate({field: bad})
            fields = [e["field"] for e in invalid_params(err.value).data["errors"]]
            # Refused by the rule, before any per-field validation, naming that field.
            assert fields == [field], (name, field, fields)


def test_ordinary_values_pass() -> None:
    assert uncarriable({"a": ["é", 1, 2.5, True, None, {"b": -(2**63)}]}) is None

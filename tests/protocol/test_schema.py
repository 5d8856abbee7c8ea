"""protocol.schema: the one validator REST bodies and socket constraints go through."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, strategies as st

from protocol.schema import CONSTRAINTS, ValidationFailed, constraints_refusal, validate

REFS = {"Point": {"type": "object", "required": ["x"], "properties": {"x": {"type": "integer"}}}}
POINT = {"$ref": "#/components/schemas/Point"}
SHAPE = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 3},
        "size": {"type": "number", "minimum": 0, "maximum": 10},
        "kind": {"enum": ["a", "b"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "at": POINT,
        "either": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
        "count": {"type": ["integer", "null"]},
        "any": {},
        "key": {"type": "string", "minLength": 1},
        "code": {"type": "string", "minLength": 2},
    },
}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"name": "abc"}, None),
        ({"name": "abc", "size": None, "tags": None, "count": None, "any": [1]}, None),
        ({"name": "abc", "size": 0, "kind": "b", "tags": ["x", "y"], "either": True}, None),
        ({"name": "abc", "at": {"x": 1}, "either": 3}, None),
        ([], "body must be object"),
        ({}, "body.name is required"),
        ({"name": 1}, "body.name must be string"),
        ({"name": "abcd"}, "body.name is longer than 3 characters"),
        ({"name": "a", "size": -1}, "body.size must be at least 0"),
        ({"name": "a", "size": 10.5}, "body.size must be at most 10"),
        ({"name": "a", "size": True}, "body.size must be number"),
        ({"name": "a", "kind": "c"}, "body.kind must be one of a, b"),
        ({"name": "a", "tags": ["x", "y", "z"]}, "body.tags has more than 2 items"),
        ({"name": "a", "tags": ["x", 1]}, "body.tags[1] must be string"),
        ({"name": "a", "at": None}, "body.at must be object"),
        ({"name": "a", "at": {}}, "body.at.x is required"),
        ({"name": "a", "at": {"x": 1.5}}, "body.at.x must be integer"),
        ({"name": "a", "either": "x"}, "body.either has an invalid value"),
        ({"name": "a", "count": "1"}, "body.count must be integer or null"),
        ({"name": "a", "key": "k", "code": "ab"}, None),
        ({"name": "a", "key": ""}, "body.key must not be empty"),
        ({"name": "a", "code": "x"}, "body.code is shorter than 2 characters"),
    ],
)
def test_validate(value: Any, message: str | None) -> None:
    """The first violation is named by its path; nulls pass for optional non-object fields."""
    if message is None:
        validate(SHAPE, value, refs=REFS)
    else:
        with pytest.raises(ValidationFailed) as info:
            validate(SHAPE, value, refs=REFS)
        assert info.value.message == message


def test_an_integral_float_is_handed_on_as_an_int() -> None:
    """120.0 is an integer to JSON Schema; handlers read it as the int 120."""
    body = {"name": "a", "count": 120.0, "size": 2.0, "at": {"x": 3.0}}
    validate(SHAPE, body, refs=REFS)
    assert body == {"name": "a", "count": 120, "size": 2.0, "at": {"x": 3}}
    assert (type(body["count"]), type(body["size"]), type(body["at"]["x"])) == (int, float, int)


@pytest.mark.parametrize(
    ("constraints", "refusal"),
    [
        ({}, None),
        ({"gpu": None, "models": None, "max_price": None, "data_classification": [1]}, None),
        ({"gpu": "A100", "min_vram_gb": 16, "models": ["a"], "max_price": 0.5}, None),
        ({"bond_required": True, "min_reputation": -1, "cuda": "12", "region": "eu"}, None),
        ("x", "constraints must be object"),
        ({"gpu": 5}, "constraints.gpu must be string"),
        ({"models": "llama"}, "constraints.models must be array"),
        ({"models": [None]}, "constraints.models[0] must be string"),
        ({"min_vram_gb": 1e7}, "constraints.min_vram_gb must be at most 1000000.0"),
        ({"max_price": -1}, "constraints.max_price must be at least 0"),
        ({"region": "r" * 129}, "constraints.region is longer than 128 characters"),
    ],
)
def test_constraints_refusal(constraints: Any, refusal: str | None) -> None:
    """Why a job's constraints break CONSTRAINTS, naming the field; None when they do not."""
    assert constraints_refusal(constraints) == refusal


@given(st.dictionaries(st.sampled_from(sorted(CONSTRAINTS["properties"])), st.none()))
def test_known_constraint_keys_may_be_null(constraints: dict[str, None]) -> None:
    """Every known key may be null (upstream clients send the whole object with nulls)."""
    assert constraints_refusal(constraints) is None

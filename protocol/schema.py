"""A small JSON Schema validator, and the input shapes both transports check with it.

Rule 1: one validator. REST validates every request body with ``validate`` (web/schemas.py
holds its schemas and publishes them in ``/openapi.json``); the client socket checks a
``job.submit``'s constraints with the same function and the same ``CONSTRAINTS`` dict, so what
one path refuses the other refuses too (docs/protocol.md, docs/rest-api.md).
Rule 2: a subset of JSON Schema (type, enum, oneOf, $ref, required, properties, items,
maxItems, minimum, maximum, minLength, maxLength): enough for the shapes here, nothing more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["CONSTRAINTS", "Schema", "ValidationFailed", "constraints_refusal", "validate"]

Schema = dict[str, Any]

_str = {"type": "string"}
_num = {"type": "number"}

# A job's matching constraints (rest-api.md §2.9 and §3.3): REST's JobCreate.constraints and the
# socket's job.submit.constraints. Unknown keys are kept and ignored; a known key may be null.
CONSTRAINTS: Schema = {
    "type": "object",
    "description": "Matching constraints (docs/protocol.md, job.submit); unknown keys are kept "
    "and ignored.",
    "properties": {
        "gpu": {**_str, "maxLength": 256, "description": "exact name in capabilities.gpus[].name"},
        "cuda": {**_str, "maxLength": 64, "description": "substring of capabilities.cuda"},
        "min_vram_gb": {**_num, "minimum": 0, "maximum": 1e6},
        "models": {"type": "array", "items": {**_str, "maxLength": 256}, "maxItems": 256},
        "region": {**_str, "maxLength": 128},
        "max_price": {**_num, "minimum": 0},
        "min_reputation": {**_num, "description": "accepted, not enforced (no reputation yet)"},
        "bond_required": {
            "type": "boolean",
            "description": "accepted, not enforced (no miner bonds yet)",
        },
    },
}


class ValidationFailed(Exception):
    """A request body or parameter broke its schema; ``message`` names the field."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def constraints_refusal(constraints: Any, where: str = "constraints") -> str | None:
    """Why a job's constraints break ``CONSTRAINTS`` (naming the field), or None."""
    try:
        validate(CONSTRAINTS, constraints, where)
    except ValidationFailed as exc:
        return exc.message
    return None


_NO_REFS: Mapping[str, Schema] = {}

_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}


def _type_ok(value: Any, names: str | list[str]) -> bool:
    for name in [names] if isinstance(names, str) else names:
        if name in ("integer", "number") and isinstance(value, bool):
            continue
        if isinstance(value, _TYPES[name]) or (name == "integer" and _integral(value)):
            return True
    return False


def _integral(value: Any) -> bool:
    """A float with no fraction, e.g. ``120.0``: an "integer" to JSON Schema (and to upstream's
    pydantic); ``_validate_object`` hands it on as an int."""
    return isinstance(value, float) and value.is_integer()


def _resolve(schema: Schema, refs: Mapping[str, Schema]) -> Schema:
    ref = schema.get("$ref")
    return refs[ref.rsplit("/", 1)[1]] if ref else schema


def validate(
    schema: Schema, value: Any, where: str = "body", refs: Mapping[str, Schema] = _NO_REFS
) -> None:
    """Raise ValidationFailed at the first violation. ``refs``: the schemas a ``$ref``
    (``#/components/schemas/<name>``) names, by name."""
    schema = _resolve(schema, refs)
    if "oneOf" in schema:
        for option in schema["oneOf"]:
            try:
                validate(option, value, where, refs)
                return
            except ValidationFailed:
                continue
        raise ValidationFailed(f"{where} has an invalid value")
    if "type" in schema and not _type_ok(value, schema["type"]):
        names = schema["type"]
        expected = names if isinstance(names, str) else " or ".join(names)
        raise ValidationFailed(f"{where} must be {expected}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValidationFailed(f"{where} must be one of {', '.join(map(str, schema['enum']))}")
    if isinstance(value, dict):
        _validate_object(schema, value, where, refs)
    elif isinstance(value, list):
        _validate_array(schema, value, where, refs)
    else:
        _validate_scalar(schema, value, where)


def _validate_scalar(schema: Schema, value: Any, where: str) -> None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise ValidationFailed(f"{where} must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ValidationFailed(f"{where} must be at most {schema['maximum']}")
    if isinstance(value, str) and len(value) > schema.get("maxLength", len(value)):
        raise ValidationFailed(f"{where} is longer than {schema['maxLength']} characters")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        if not value:
            raise ValidationFailed(f"{where} must not be empty")
        raise ValidationFailed(f"{where} is shorter than {schema['minLength']} characters")


def _validate_array(
    schema: Schema, value: list[Any], where: str, refs: Mapping[str, Schema]
) -> None:
    if len(value) > schema.get("maxItems", len(value)):
        raise ValidationFailed(f"{where} has more than {schema['maxItems']} items")
    if "items" in schema:
        for n, item in enumerate(value):
            validate(schema["items"], item, f"{where}[{n}]", refs)


def _validate_object(
    schema: Schema, value: dict[str, Any], where: str, refs: Mapping[str, Schema]
) -> None:
    required = schema.get("required", ())
    for key in required:
        if key not in value:
            raise ValidationFailed(f"{where}.{key} is required")
    for key, sub in schema.get("properties", {}).items():
        if key not in value:
            continue
        if value[key] is None and key not in required and _nullable_ok(sub, refs):
            continue  # optional fields may be null (upstream clients send nulls)
        validate(sub, value[key], f"{where}.{key}", refs)
        if _integral(value[key]) and "integer" in _types(_resolve(sub, refs)):
            value[key] = int(value[key])  # handlers read integers as ints


def _types(schema: Schema) -> list[str]:
    names = schema.get("type", [])
    return [names] if isinstance(names, str) else list(names)


def _nullable_ok(schema: Schema, refs: Mapping[str, Schema]) -> bool:
    """Optional fields may be null unless their schema says otherwise (upstream sends nulls)."""
    schema = _resolve(schema, refs)
    return schema.get("type") != "object" or "properties" not in schema

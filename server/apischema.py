"""Declared JSON schemas of the server API's bodies, and the check against them.

The schemas are plain JSON Schema (the subset below), so the same dicts are
checked here and published in the OpenAPI document (server/api.py): what a
backend reads there is exactly what the relay enforces.

Supported keywords: ``type`` (one name or a list), ``properties``,
``required``, ``additionalProperties: false``, ``items``, ``minItems``,
``maxItems``, ``minLength``, ``maxLength``, ``minimum``, ``maximum``,
``pattern``, ``enum``, ``not`` with ``enum``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float), "null": (type(None),),
}


class SchemaError(ValueError):
    """The body does not match its schema; the message names the first offending field."""


@lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _type_ok(value: Any, names: str | list[str]) -> bool:
    for name in [names] if isinstance(names, str) else names:
        kinds = _TYPES[name]
        # JSON has no separate bool: true is not an integer here.
        if isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds):
            return True
    return False


def check(value: Any, schema: dict[str, Any], where: str = "body") -> None:
    """Raise :class:`SchemaError` unless ``value`` matches ``schema``."""
    if "type" in schema and not _type_ok(value, schema["type"]):
        raise SchemaError(f"{where} must be of type {schema['type']}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(f"{where} must be one of {schema['enum']}")
    if "not" in schema and value in schema["not"].get("enum", ()):
        raise SchemaError(f"{where} may not be {value!r}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", len(value)):
            raise SchemaError(f"{where} must be {schema.get('minLength', 0)}.."
                              f"{schema.get('maxLength', '')} characters")
        if "pattern" in schema and not _compiled(schema["pattern"]).fullmatch(value):
            raise SchemaError(f"{where} must match {schema['pattern']}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            raise SchemaError(f"{where} must be within {schema.get('minimum', '')}.."
                              f"{schema.get('maximum', '')}")
    elif isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            raise SchemaError(f"{where} must have {schema.get('minItems', 0)}.."
                              f"{schema.get('maxItems', '')} items")
        for i, item in enumerate(value):
            check(item, schema.get("items", {}), f"{where}[{i}]")
    elif isinstance(value, dict):
        _check_object(value, schema, where)


def _check_object(value: dict[str, Any], schema: dict[str, Any], where: str) -> None:
    properties = schema.get("properties", {})
    for name in schema.get("required", ()):
        if name not in value:
            raise SchemaError(f"{where}.{name} is required")
    for name, item in value.items():
        if name in properties:
            check(item, properties[name], f"{where}.{name}")
        elif schema.get("additionalProperties", True) is False:
            raise SchemaError(f"{where}.{name} is not a known field")

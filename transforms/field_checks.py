"""A record schema's validation compiled once: one check per field, made from the schema when a
job starts, instead of fastavro's walk of the schema for every record.

Each check says what ``fastavro.validation.validate`` says of a field's value, for every value
a JSON decoder gives (None, bool, int, float, str, list, dict). Only fields of the types that
event payloads use are compiled: primitives, enums, and unions of those. A schema with any other
field (a record, array, map or fixed, a logical type, a named type used twice) is not compiled:
its records are validated by fastavro, as before.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

INT_RANGE = (-(2**31), 2**31 - 1)
LONG_RANGE = (-(2**63), 2**63 - 1)


def _integer(low: int, high: int) -> Callable:
    return lambda v: isinstance(v, (int, numbers.Integral)) and low <= v <= high and not isinstance(v, bool)


# The tests of fastavro's validators, type by type (``fastavro._validation``).
_PRIMITIVES = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "bytes": lambda v: isinstance(v, (bytes, bytearray)),
    "int": _integer(*INT_RANGE),
    "long": _integer(*LONG_RANGE),
    "float": lambda v: isinstance(v, (int, float, numbers.Real)) and not isinstance(v, bool),
    "double": lambda v: isinstance(v, (int, float, numbers.Real)) and not isinstance(v, bool),
}


def _check(avro_type) -> Callable | None:
    """The check of one field type, or None if it is not one this module compiles."""
    if isinstance(avro_type, str):
        return _PRIMITIVES.get(avro_type)
    if isinstance(avro_type, list):
        branches = [_check(branch) for branch in avro_type]
        if None in branches:
            return None
        if len(branches) == 2 and avro_type[0] == "null":
            other = branches[1]
            return lambda v: v is None or other(v)
        return lambda v: any(branch(v) for branch in branches)
    if isinstance(avro_type, dict) and "logicalType" not in avro_type:
        if avro_type.get("type") == "enum":
            symbols = list(avro_type["symbols"])
            return lambda v: v in symbols
        if avro_type.get("type") in _PRIMITIVES:
            return _PRIMITIVES[avro_type["type"]]
    return None


def compile_fields(schema: dict) -> list[tuple[str, Callable]] | None:
    """``[(field name, check)]`` in the schema's order, for a parsed record schema whose every
    field this module compiles; None otherwise. A record of JSON values passes every check
    exactly when ``fastavro.validation.validate(record, schema)`` holds."""
    checks = [(field["name"], _check(field["type"])) for field in schema["fields"]]
    return None if any(check is None for _, check in checks) else checks

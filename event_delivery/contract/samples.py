"""Plausible values for any schema the registry accepts: the load generator's events,
the compatibility check's samples and the tests' fixtures all come from here.

A field may guide its values with the registry's ``examples`` (values to pick from)
and ``range`` (``[low, high]`` for numbers). Every Avro type that a JSON payload can
carry has a generator: primitives, enums, records, arrays, maps, unions and the
logical types over them (the registry refuses ``bytes`` and ``fixed``).
"""

from __future__ import annotations

import random
import uuid

NULL_SHARE = 0.1  # how often a nullable value is null
MAX_ITEMS = 3  # the longest generated array or map

_LOGICAL_RANGES = {
    "timestamp-millis": (1_600_000_000_000, 1_900_000_000_000),
    "timestamp-micros": (1_600_000_000_000_000, 1_900_000_000_000_000),
    "local-timestamp-millis": (1_600_000_000_000, 1_900_000_000_000),
    "local-timestamp-micros": (1_600_000_000_000_000, 1_900_000_000_000_000),
    "date": (18_000, 22_000),
    "time-millis": (0, 86_399_999),
    "time-micros": (0, 86_399_999_999),
}


def fake_fields(event_type, rng: random.Random, subjects: int) -> dict:
    """A payload of ``event_type``, about one of ``subjects`` data subjects."""
    subject = f"user-{rng.randrange(subjects):06d}" if event_type.subject_field else None
    named = _named_types(event_type.schema)
    return {
        f["name"]: subject if f["name"] == event_type.subject_field else _value(f["type"], f, rng, named)
        for f in event_type.schema["fields"]
    }


def _named_types(node, named=None) -> dict:
    """Every named type (record, enum, fixed) of a schema, by name and by full name."""
    named = {} if named is None else named
    if isinstance(node, list):
        for branch in node:
            _named_types(branch, named)
    elif isinstance(node, dict):
        if node.get("type") in ("record", "enum", "fixed"):
            named[node["name"]] = named[f"{node.get('namespace', '')}.{node['name']}".lstrip(".")] = node
        for field in node.get("fields", ()):
            _named_types(field["type"], named)
        for nested in ("items", "values"):
            if nested in node:
                _named_types(node[nested], named)
    return named


def _value(avro_type, field: dict, rng: random.Random, named: dict):
    if isinstance(avro_type, list):
        branches = [t for t in avro_type if t != "null"]
        if len(branches) < len(avro_type) and (not branches or rng.random() < NULL_SHARE):
            return None
        return _value(branches[0] if len(branches) == 1 else rng.choice(branches), field, rng, named)
    if isinstance(avro_type, dict):
        return _complex(avro_type, field, rng, named)
    if avro_type in named:
        return _value(named[avro_type], field, rng, named)
    return _primitive(avro_type, field, rng)


def _complex(avro_type: dict, field: dict, rng: random.Random, named: dict):
    kind = avro_type["type"]
    if kind == "record":
        return {f["name"]: _value(f["type"], f, rng, named) for f in avro_type["fields"]}
    if kind == "enum":
        return rng.choice(avro_type["symbols"])
    if kind == "array":
        return [_value(avro_type["items"], field, rng, named) for _ in range(rng.randint(0, MAX_ITEMS))]
    if kind == "map":
        return {f"key-{i}": _value(avro_type["values"], field, rng, named) for i in range(rng.randint(0, MAX_ITEMS))}
    logical = avro_type.get("logicalType")
    if logical in _LOGICAL_RANGES:
        return rng.randint(*_LOGICAL_RANGES[logical])
    if logical == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128)))
    return _value(kind, field, rng, named)


def _primitive(avro_type: str, field: dict, rng: random.Random):
    if field.get("examples"):
        return rng.choice(field["examples"])
    low, high = field.get("range", (0, 1000))
    if avro_type in ("int", "long"):
        return rng.randint(int(low), int(high))
    if avro_type in ("float", "double"):
        return round(rng.uniform(low, high), 6)
    if avro_type == "boolean":
        return rng.random() < 0.5
    if avro_type == "string":
        return f"{field['name']}-{rng.getrandbits(32):08x}"
    if avro_type == "null":
        return None
    raise ValueError(f"field {field['name']!r}: no generator for type {avro_type!r}")

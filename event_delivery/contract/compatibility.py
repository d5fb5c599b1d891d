"""Schema evolution: a new version of a type's schema must read everything the old one wrote.

Compatibility is checked the way Avro readers resolve schemas: records written with
the old schema (generated to cover every field, null branches included) must decode
with the new schema as the reader schema.

No job calls it: it is the gate a schema change passes before it merges.
``tests/unit/test_registry.py`` runs it on every schema against each earlier version git
holds, so CI refuses a change that could not read what the old version wrote.
"""

from __future__ import annotations

import io
import random

import fastavro

from event_delivery.contract.registry import EventType
from event_delivery.contract.samples import fake_fields

SAMPLES = 64


class IncompatibleSchema(ValueError):
    """The new schema cannot read data written with the old one."""


def _samples(event_type: EventType, rng: random.Random) -> list[dict]:
    return [fake_fields(event_type, rng, SAMPLES) for _ in range(SAMPLES)]


def check_backward_compatible(old: EventType, new: EventType) -> None:
    """Raises ``IncompatibleSchema`` naming the problem if ``new`` cannot read ``old`` data."""
    writer = old.parsed_clear_schema
    buffer = io.BytesIO()
    records = [
        {"event_id": f"e{i}", "received_at": 0, **fields} for i, fields in enumerate(_samples(old, random.Random(0)))
    ]
    fastavro.writer(buffer, writer, records)
    buffer.seek(0)
    try:
        list(fastavro.reader(buffer, reader_schema=new.parsed_clear_schema))
    except (fastavro.read.SchemaResolutionError, ValueError, KeyError, TypeError) as error:
        raise IncompatibleSchema(f"{new.name}: the new schema cannot read old data: {error}") from None

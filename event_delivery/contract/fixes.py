"""Registered fixes for dead-lettered messages, applied by the redrive job before re-parsing.

A fix maps a raw message ``(data, attributes)`` to a repaired one. It may drop what made
a message unreadable, but never invents a value. Many dead letters need no fix at all:
a schema update that adds the missing field, with a default, is enough (fix ``none``).
"""

from __future__ import annotations

import json

from event_delivery.contract import envelope


def none(data: bytes, attributes: dict, event_type) -> tuple[bytes, dict]:
    return data, attributes


def arrival_time_for_bad_timestamps(data: bytes, attributes: dict, event_type) -> tuple[bytes, dict]:
    """Drops an unparseable ``received_at``, so the hour falls back to the arrival time."""
    raw = attributes.get(envelope.RECEIVED_AT)
    if raw is None:
        return data, attributes
    try:
        envelope.parse_received_at(raw)
    except envelope.BadTimestamp:
        return data, {k: v for k, v in attributes.items() if k != envelope.RECEIVED_AT}
    return data, attributes


def strip_unknown_fields(data: bytes, attributes: dict, event_type) -> tuple[bytes, dict]:
    """Drops payload fields the schema does not know (a producer ahead of its schema). A payload
    that is no JSON object, or nests too deeply to decode, is left as it is."""
    try:
        fields = json.loads(data)
    except (ValueError, RecursionError):
        return data, attributes
    if not isinstance(fields, dict):
        return data, attributes
    known = {k: v for k, v in fields.items() if k in event_type.field_names}
    return json.dumps(known).encode(), attributes


FIXES = {fix.__name__: fix for fix in (none, arrival_time_for_bad_timestamps, strip_unknown_fields)}

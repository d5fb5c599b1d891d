"""Dead letters: the messages that could not be delivered, and why."""

from __future__ import annotations

import enum
import functools

import fastavro


class ErrorKind(str, enum.Enum):
    """Why a message was dead-lettered. The values are stored in files and metrics."""

    TOO_LARGE = "too_large"
    EMPTY = "empty"
    MISSING_ID = "missing_id"
    TYPE_MISMATCH = "type_mismatch"
    BAD_TIMESTAMP = "bad_timestamp"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    NOT_OBJECT = "not_object"
    SCHEMA_VIOLATION = "schema_violation"
    WRITE_FAILED = "write_failed"  # a valid event whose file could not be written, for good


# What can be wrong with a message itself, as parsing finds it.
MESSAGE_ERRORS = tuple(kind for kind in ErrorKind if kind is not ErrorKind.WRITE_FAILED)


DEAD_LETTER_SCHEMA = {
    "type": "record",
    "name": "DeadLetter",
    "namespace": "eventdelivery",
    "doc": "A message that could not be delivered, with the reason and everything needed to replay it.",
    "fields": [
        {"name": "event_id", "type": ["null", "string"], "default": None},
        {
            "name": "received_at",
            "type": {"type": "long", "logicalType": "timestamp-millis"},
            "doc": "The message's received_at, or its arrival time when that is missing or bad.",
        },
        {"name": "event_type", "type": "string"},
        {"name": "error_kind", "type": {"type": "enum", "name": "ErrorKind", "symbols": [k.name for k in ErrorKind]}},
        {"name": "error_detail", "type": "string", "doc": "Names fields and limits, never values."},
        {
            "name": "attributes",
            "type": {"type": "map", "values": "string"},
            "doc": "The envelope attributes (event_id, received_at, event_type), in clear. Records written "
            "before sealed_attributes existed hold every attribute here.",
        },
        {
            "name": "payload",
            "type": ["null", "bytes"],
            "default": None,
            "doc": "The raw message data, AES-256-GCM encrypted: it may hold personal data that never passed "
            "validation. Null when it named a subject that was already forgotten.",
        },
        {
            "name": "quarantine_key_id",
            "type": ["null", "string"],
            "default": None,
            "doc": "The key that seals the payload: the subject's, when the payload names one, else the "
            "type's quarantine key.",
        },
        {
            "name": "sealed_attributes",
            "type": ["null", "bytes"],
            "default": None,
            "doc": "The producer's other attributes, as AES-256-GCM of their JSON under the payload's key; "
            "null when there are none, or the payload is.",
        },
    ],
}


@functools.cache
def parsed_dead_letter_schema():
    return fastavro.parse_schema(DEAD_LETTER_SCHEMA)


def dead_letter(event_type, kind: ErrorKind, detail, event_id, received_at_millis, attributes, payload) -> dict:
    """A dead-letter record ready for Avro."""
    return {
        "event_id": event_id,
        "received_at": received_at_millis,
        "event_type": event_type,
        "error_kind": kind.name,
        "error_detail": detail,
        "attributes": dict(attributes),
        "payload": payload,
        "quarantine_key_id": None,
        "sealed_attributes": None,
    }


def quarantine_key_name(event_type: str) -> str:
    """The keystore name of the key that seals a type's dead-letter payloads."""
    return f"quarantine/{event_type}"

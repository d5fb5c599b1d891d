"""Dead letters: the messages that could not be delivered, and why."""

from __future__ import annotations

import enum
import functools
import json
import time

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
    KEY_UNAVAILABLE = "key_unavailable"  # a valid event whose subject's key the keystore cannot give, for good


# What went wrong on the way for a valid event, not with the message itself: redrive it once the cause is fixed.
DELIVERY_ERRORS = (ErrorKind.WRITE_FAILED, ErrorKind.KEY_UNAVAILABLE)
# What can be wrong with a message itself, as parsing finds it.
MESSAGE_ERRORS = tuple(kind for kind in ErrorKind if kind not in DELIVERY_ERRORS)


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
            "doc": "The key that seals the payload: the subject's, when the payload names one and the "
            "keystore can give it, else the type's quarantine key (always for KEY_UNAVAILABLE).",
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


QUARANTINE_RETENTION_DAYS = 30  # dead letters, and the quarantine keys that seal them, are kept this long
QUARANTINE_KEYS = "quarantine/"
DAY_SECONDS = 24 * 3600


def quarantine_key_name(event_type: str, received_at_millis: int) -> str:
    """The keystore name of the key that seals a type's messages that name no subject (dead letters,
    archived messages), one per UTC day of their ``received_at``: a key seals one day's messages,
    far fewer than the 2^32 that AES-GCM's random nonces allow, and it can be deleted once the
    day is past the quarantine retention."""
    return f"{QUARANTINE_KEYS}{event_type}/{_day(received_at_millis / 1000)}"


def _day(seconds: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(seconds))


def expired_quarantine_keys(names, retention_days: int, now: float) -> list[str]:
    """The quarantine key names whose day ended ``retention_days`` or more ago. A name without a day
    (one key for every day, before keys were rotated) is never judged here: delete it by hand once
    the retention has passed since the upgrade."""
    cutoff = _day(now - retention_days * DAY_SECONDS)
    expired = []
    for name in names:
        parts = name.split("/")
        if len(parts) == 3 and parts[0] + "/" == QUARANTINE_KEYS and parts[2] < cutoff:
            expired.append(name)
    return expired


def subject_named_in(payload: bytes, subject_field: str | None) -> str | None:
    """The data subject a payload names, if it is a JSON object that does. Only a valid event's names
    a subject validation vouched for: seal nothing else under the key of what this returns."""
    if not subject_field or not payload:
        return None
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    subject = obj.get(subject_field) if isinstance(obj, dict) else None
    return subject if isinstance(subject, str) and subject else None

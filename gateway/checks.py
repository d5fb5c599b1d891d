"""Envelope checks: what the gateway refuses at the door, each with its status and a one-line reason.

Only the envelope is checked (the body parses, each event is a JSON object of bounded size,
an ``event_id`` given is a non-empty string); the schema stays the jobs' concern, so a schema
change never needs a gateway deploy.
"""

from __future__ import annotations

import json

from event_delivery.contract import envelope

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"})


class Refused(Exception):
    """An HTTP answer other than 200: its status, a one-line reason, and the metric label of why."""

    def __init__(self, status: int, reason: str, label: str, headers: dict | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.label = label
        self.headers = headers or {}


def check_header_bytes(raw_headers, limit: int) -> None:
    """431 when the headers, names and values together, pass ``limit`` bytes."""
    if sum(len(name) + len(value) for name, value in raw_headers) > limit:
        raise Refused(431, f"request headers are larger than {limit} bytes", "headers_too_large")


def check_content_length(content_length: int | None, limit: int) -> None:
    if content_length is not None and content_length > limit:
        raise Refused(413, f"body is larger than {limit} bytes", "body_too_large")


def events_from_body(content_type: str, body: bytes, max_event_bytes: int) -> list[dict]:
    """The events of a body: one JSON object (``application/json``) or one per line (NDJSON)."""
    if content_type in JSON_TYPES:
        chunks = [(None, body)]
    elif content_type in NDJSON_TYPES:
        chunks = [(number, line) for number, line in enumerate(body.split(b"\n"), start=1) if line.strip()]
    else:
        expected = ", ".join(sorted(JSON_TYPES | NDJSON_TYPES))
        raise Refused(415, f"content type {content_type or 'none'!r} is not one of {expected}", "content_type")
    if not chunks or not body.strip():
        raise Refused(400, "body holds no event", "empty")
    return [_event(chunk, number, max_event_bytes) for number, chunk in chunks]


def _event(chunk: bytes, number: int | None, max_event_bytes: int) -> dict:
    where = "body" if number is None else f"line {number}"
    if len(chunk) > max_event_bytes:
        raise Refused(413, f"{where}: event is larger than {max_event_bytes} bytes", "event_too_large")
    try:
        event = json.loads(chunk)
    except UnicodeDecodeError:
        raise Refused(400, f"{where}: not UTF-8", "not_json") from None
    except json.JSONDecodeError as error:
        raise Refused(400, f"{where}: not JSON: {error.msg} at column {error.colno}", "not_json") from None
    if not isinstance(event, dict):
        raise Refused(400, f"{where}: not a JSON object", "not_object")
    event_id = event.get(envelope.EVENT_ID)
    if envelope.EVENT_ID in event and not (isinstance(event_id, str) and event_id):
        raise Refused(400, f"{where}: {envelope.EVENT_ID} must be a non-empty string", "bad_event_id")
    return event


def split_event_id(event: dict) -> tuple[dict, str | None]:
    """``(fields, event_id)``: a client's own ``event_id`` travels as the attribute, not a field."""
    fields = dict(event)
    return fields, fields.pop(envelope.EVENT_ID, None)

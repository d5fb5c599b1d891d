"""A delivered event as its encoded Avro record, from the step that seals it to its file.

An event is parsed, sealed and encoded once, in the bundle that read it. From there on it
is ``(event_id, received_at_millis, record, forgotten)``: ``record`` the bytes of its Avro
record under the type's delivered schema (schemaless, as ``fastavro.schemaless_writer``
writes one), ``forgotten`` whether its subject was forgotten (its personal fields null).
That is what every shuffle after sealing carries, and a pane's file is its records' bytes
concatenated into Avro blocks (``files.write_encoded_avro``). No step after sealing reads a
field but the id and the arrival; the rare one that needs more (the dead letters of a
failed write) decodes the record.
"""

from __future__ import annotations

import io
import json
import zlib

import fastavro

from event_delivery.cloud.files import RECORD_MISFITS, AvroWriteError


def schema_fingerprint(event_type) -> int:
    """A 31-bit fingerprint of the type's delivered schema, all of it (docs and defaults too).

    Events in flight carry their records encoded under the running job's schema, with nothing
    that names it, and an hour's staged files of one run share its parts, which take one
    schema, header and all (``files.concatenate_avro``). So an in-place update may change
    nothing of it (``tools.ops.job_flags.job_layout``). 31 bits: job options are recorded as
    JSON numbers, and compared as ints."""
    whole = json.dumps(event_type.delivered_schema, sort_keys=True, separators=(",", ":"))
    return zlib.crc32(whole.encode("utf-8")) & 0x7FFF_FFFF


def event_record(event) -> dict:
    """A sealed ``(event_id, received_at_millis, fields)`` event's delivered Avro record."""
    event_id, received_at_millis, fields = event
    return {"event_id": event_id, "received_at": received_at_millis, **fields}


def encoded_event(event_id: str, received_at_millis: int, record: bytes, forgotten: bool) -> tuple:
    return (event_id, received_at_millis, record, forgotten)


def is_forgotten(event) -> bool:
    return event[3]


class RecordCoder:
    """Encodes records of one parsed schema to their Avro bytes, and back as the message carried
    them: a logical type's value as its underlying one (a ``timestamp-millis`` as its int)."""

    def __init__(self, parsed_schema):
        self.schema = parsed_schema
        self.plain_schema = None  # the schema without its logical types: made on the first decode

    def encode(self, record: dict) -> bytes:
        """The record's bytes; ``AvroWriteError`` if the schema does not take it (never quoting a value)."""
        buffer = io.BytesIO()
        try:
            fastavro.schemaless_writer(buffer, self.schema, record)
        except RECORD_MISFITS:
            raise AvroWriteError("a record does not match the Avro schema") from None
        return buffer.getvalue()

    def decode(self, encoded: bytes) -> dict:
        if self.plain_schema is None:
            self.plain_schema = _without_logical_types(self.schema)
        return fastavro.schemaless_reader(io.BytesIO(encoded), self.plain_schema, None)


def _without_logical_types(schema):
    """A copy of a (parsed) schema with no ``logicalType``: its values decode as their underlying types."""
    if isinstance(schema, dict):
        return {k: _without_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_without_logical_types(v) for v in schema]
    return schema

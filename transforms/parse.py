"""Parse and validate raw messages against the type's schema; failures become dead letters."""

from __future__ import annotations

import io
import json
import sys

import apache_beam as beam
import fastavro
from apache_beam.metrics import Metrics
from fastavro.validation import ValidationError, validate

from event_delivery.contract import envelope, slo
from event_delivery.contract.dead_letters import MESSAGE_ERRORS, ErrorKind, dead_letter
from event_delivery.contract.registry import EventType
from transforms import collector
from transforms.field_checks import compile_fields
from transforms.results import ParsedMessages

DEAD_LETTERS = "dead_letters"
RAW_MESSAGES = "raw_messages"
_MISSING = object()


def _anything(value) -> bool:
    return True


_DOUBLE_DIGITS = len(str(int(sys.float_info.max))) - 1  # no int with fewer digits is past a double


class _Rejected(Exception):
    """Internal: a message failed one check. The detail never quotes payload values."""

    def __init__(self, kind: ErrorKind, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range")
    return value


def _storable_int(text):
    """An int that some Avro number can hold: one past the range of a double (a valid JSON number
    of 309 digits or more) passes fastavro's validation of a double field but fails its write."""
    value = int(text)
    if len(text) > _DOUBLE_DIGITS and abs(value) > sys.float_info.max:
        raise ValueError("number out of range")
    return value


def _unique_keys(pairs):
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate object key")
    return obj


def _reads_back(record: dict, schema) -> bool:
    """Whether ``record`` writes as Avro and reads back: what passes this is readable by every step
    and job that reads its file."""
    buffer = io.BytesIO()
    try:
        fastavro.schemaless_writer(buffer, schema, record)
        buffer.seek(0)
        fastavro.schemaless_reader(buffer, schema)
    except Exception:  # fastavro's readers of logical types raise several unrelated types
        return False
    return True


def _strings_encode(value) -> bool:
    """False if any string holds a lone surrogate, which no UTF-8 file can store."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_strings_encode(k) and _strings_encode(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_strings_encode(v) for v in value)
    return True


class ParseEventFn(beam.DoFn):
    """Turns a ``PubsubMessage`` into ``(event_id, received_at_millis, record)``.

    Anything that cannot become such an event goes to the ``dead_letters`` output as
    ``(event_id or "", received_at_millis, dead_letter_record)``, with a kind from
    ``ErrorKind``. When ``received_at`` is missing or bad, the message's arrival
    time (its Pub/Sub ``publish_time``, which ``ReadMessages`` guarantees) stands in
    for it.

    With ``keep_raw``, every message also goes to the ``raw_messages`` output as
    ``(event_id or "", received_at_millis, (subject or None, arrival_millis, attributes, data))``
    for the raw archive; the subject is given only for valid events, so that no key is ever made
    for a string that only a malformed message names.
    """

    def __init__(
        self,
        event_type: EventType,
        max_event_bytes: int,
        late_horizon_seconds: int,
        max_future_seconds: int,
        keep_raw: bool = False,
    ):
        self.event_type = event_type
        self.max_event_bytes = max_event_bytes
        self.late_horizon_millis = late_horizon_seconds * 1000
        self.max_future_millis = max_future_seconds * 1000
        self.keep_raw = keep_raw

    def setup(self):
        collector.tune_for_streams()  # the first step of every job that delivers
        self.schema = self.event_type.parsed_payload_schema
        # Each field's check compiled from the schema once, where it allows (a third of fastavro's
        # cost per record); else fastavro validates the record whole.
        checks = compile_fields(self.schema)
        self.compiled = checks is not None
        checks = dict(checks or ())
        self.fields = [
            (f["name"], f.get("default", _MISSING), checks.get(f["name"], _anything))
            for f in self.event_type.schema["fields"]
        ]
        self.field_names = {name for name, _, _ in self.fields}
        hooks = dict(parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys)
        self.decoder = json.JSONDecoder(**hooks)
        # Only a text this long can hold an int past a double: reading every int through a hook
        # costs a tenth of parsing, and most payloads are shorter.
        self.long_text_decoder = json.JSONDecoder(**hooks, parse_int=_storable_int)
        self.received = Metrics.counter(slo.NAMESPACE, slo.RECEIVED)
        self.dead_lettered = {k: Metrics.counter(slo.NAMESPACE, slo.dead_lettered(k.value)) for k in MESSAGE_ERRORS}

    def process(self, message):
        self.received.inc()
        attributes = message.attributes or {}
        data = message.data or b""
        # Without a publish time (a message from elsewhere than Pub/Sub), arrival is unknown.
        published = message.publish_time
        arrival_millis = None if published is None else int(published.timestamp() * 1000)
        event_id = attributes.get(envelope.EVENT_ID) or None
        received_at = arrival_millis or 0
        try:
            received_at = self._received_at(attributes, arrival_millis)
            record = self._validate(event_id, attributes, data)
        except _Rejected as rejected:
            self.dead_lettered[rejected.kind].inc()
            record = dead_letter(
                self.event_type.name, rejected.kind, rejected.detail, event_id, received_at, attributes, data
            )
            yield beam.pvalue.TaggedOutput(DEAD_LETTERS, (event_id or "", received_at, record))
            if self.keep_raw:  # no subject: only validation vouches for one (see transforms.archive)
                yield beam.pvalue.TaggedOutput(
                    RAW_MESSAGES, (event_id or "", received_at, (None, arrival_millis, attributes, data))
                )
            return
        yield (event_id, received_at, record)
        if self.keep_raw:
            subject = record[self.event_type.subject_field] if self.event_type.subject_field else None
            yield beam.pvalue.TaggedOutput(
                RAW_MESSAGES, (event_id, received_at, (subject, arrival_millis, attributes, data))
            )

    def _received_at(self, attributes, arrival_millis) -> int:
        raw = attributes.get(envelope.RECEIVED_AT)
        if raw is None:
            if arrival_millis is None:
                raise _Rejected(ErrorKind.BAD_TIMESTAMP, "no received_at and no arrival time")
            return arrival_millis
        try:
            millis = envelope.parse_received_at(raw)
        except envelope.BadTimestamp as error:
            raise _Rejected(ErrorKind.BAD_TIMESTAMP, str(error)) from None
        if arrival_millis is None:
            return millis
        # Beyond these bounds the event would either be dropped by the runner as too
        # late, or hold a window open far into the future.
        if millis < arrival_millis - self.late_horizon_millis:
            raise _Rejected(ErrorKind.BAD_TIMESTAMP, "received_at is older than the late horizon")
        if millis > arrival_millis + self.max_future_millis:
            raise _Rejected(ErrorKind.BAD_TIMESTAMP, "received_at is too far in the future")
        return millis

    def _validate(self, event_id, attributes, data: bytes) -> dict:
        if len(data) > self.max_event_bytes:
            raise _Rejected(ErrorKind.TOO_LARGE, f"payload is {len(data)} bytes; the limit is {self.max_event_bytes}")
        if not event_id:
            raise _Rejected(ErrorKind.MISSING_ID, "attribute event_id is missing or empty")
        declared = attributes.get(envelope.EVENT_TYPE)
        if declared is not None and declared != self.event_type.name:
            raise _Rejected(ErrorKind.TYPE_MISMATCH, f"attribute event_type is not {self.event_type.name!r}")
        if not data:
            raise _Rejected(ErrorKind.EMPTY, "payload is empty")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _Rejected(ErrorKind.NOT_UTF8, f"payload is not UTF-8 (byte {error.start})") from None
        try:
            obj = (self.decoder if len(text) <= _DOUBLE_DIGITS else self.long_text_decoder).decode(text)
        except RecursionError:
            raise _Rejected(ErrorKind.NOT_JSON, "payload nests too deeply") from None
        except ValueError as error:
            reason = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
            raise _Rejected(ErrorKind.NOT_JSON, f"payload is not JSON: {reason}") from None
        if not isinstance(obj, dict):
            raise _Rejected(ErrorKind.NOT_OBJECT, "payload is JSON but not an object")
        return self._conform(obj, has_escapes="\\u" in text)

    def _conform(self, obj: dict, has_escapes: bool) -> dict:
        unknown = len(obj.keys() - self.field_names)
        if unknown:
            # Unknown keys are not quoted: a broken producer may put personal data there.
            raise _Rejected(ErrorKind.SCHEMA_VIOLATION, f"{unknown} field(s) not in the schema")
        record, valid = {}, True
        for name, default, check in self.fields:
            value = obj.get(name, default)
            if value is _MISSING:
                raise _Rejected(ErrorKind.SCHEMA_VIOLATION, f"required field {name!r} is missing")
            record[name] = value
            valid = valid and check(value)
        if not (valid and (self.compiled or validate(record, self.schema, raise_errors=False))):
            raise _Rejected(ErrorKind.SCHEMA_VIOLATION, f"field(s) {self._invalid_fields(record)} have the wrong type")
        if has_escapes and not _strings_encode(record):
            raise _Rejected(ErrorKind.SCHEMA_VIOLATION, "a string holds a lone surrogate")
        if self.event_type.holds_logical_types and not _reads_back(record, self.schema):
            raise _Rejected(ErrorKind.SCHEMA_VIOLATION, "a value does not read back as its logical type")
        return record

    def _invalid_fields(self, record) -> str:
        try:
            validate(record, self.schema, raise_errors=True)
        except ValidationError as error:
            names = sorted({str(e.field).rsplit(".", 1)[-1] for e in error.errors})
            return ", ".join(repr(n) for n in names)
        return "?"


class ParseEvents(beam.PTransform):
    """Messages in; a ``ParsedMessages`` out: the events (``output``), the ``dead_letters``, and
    (with ``keep_raw``) the ``raw_messages``.

    ``settings`` are the job's ``DeliverySettings``: the type, its size limit and its
    bounds on ``received_at``.
    """

    def __init__(self, settings, keep_raw: bool = False):
        super().__init__()
        self.fn = ParseEventFn(
            settings.event_type,
            settings.max_event_bytes,
            settings.late_horizon_seconds,
            settings.max_future_seconds,
            keep_raw,
        )

    def expand(self, messages):
        parsed = messages | "Parse" >> beam.ParDo(self.fn).with_outputs(DEAD_LETTERS, RAW_MESSAGES, main="events")
        return ParsedMessages(parsed.events, parsed[DEAD_LETTERS], parsed[RAW_MESSAGES])

"""The input contract: what a Pub/Sub message of an event carries besides its payload."""

from __future__ import annotations

import datetime

EVENT_ID = "event_id"
RECEIVED_AT = "received_at"
EVENT_TYPE = "event_type"
ENVELOPE_ATTRIBUTES = (EVENT_ID, RECEIVED_AT, EVENT_TYPE)

# The field names that sealing binds into a ciphertext's associated data, beside a type's
# own field names: a dead letter's payload, an archived message's payload, and the
# producer's attributes that are sealed with either. No type may have a field of these names.
SEALED_PAYLOAD = "payload"
SEALED_RAW = "raw"
SEALED_ATTRIBUTES = "attributes"
SEALING_LABELS = (SEALED_PAYLOAD, SEALED_RAW, SEALED_ATTRIBUTES)

# Timestamps outside this range are refused as bad: before it they are nonsense, and
# after it they would open windows that close in decades.
EARLIEST_MILLIS = 0
LATEST_MILLIS = 4102444800000  # 2100-01-01T00:00:00Z


def split_attributes(attributes: dict) -> tuple[dict, dict]:
    """``(envelope, others)``: the envelope attributes, which stay in clear (they decide the id,
    the hour and the type, and carry nothing personal), and the producer's other attributes,
    which the contract does not restrict, so they are sealed with the payload they came with."""
    envelope, others = {}, {}
    for name, value in attributes.items():
        (envelope if name in ENVELOPE_ATTRIBUTES else others)[name] = value
    return envelope, others


class BadTimestamp(ValueError):
    """A ``received_at`` that is neither RFC 3339 nor epoch millis in range."""


def parse_received_at(value: str) -> int:
    """Epoch millis from an RFC 3339 string or a decimal count of epoch millis."""
    text = value.strip()
    if text.isdigit() and text.isascii():
        digits = text.lstrip("0") or "0"  # Python refuses to read an int of 4,300 digits or more
        if len(digits) > len(str(LATEST_MILLIS)):
            raise BadTimestamp("received_at is outside 1970..2100")
        millis = int(digits)
    else:
        try:
            parsed = datetime.datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError:
            raise BadTimestamp("received_at is neither RFC 3339 nor epoch millis") from None
        if parsed.tzinfo is None:
            raise BadTimestamp("received_at has no UTC offset")
        millis = round(parsed.timestamp() * 1000)
    if not EARLIEST_MILLIS <= millis < LATEST_MILLIS:
        raise BadTimestamp("received_at is outside 1970..2100")
    return millis


def format_received_at(millis: int) -> str:
    """RFC 3339 in UTC with millisecond precision, as the entry point stamps it."""
    moment = datetime.datetime.fromtimestamp(millis / 1000, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

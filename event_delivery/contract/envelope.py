"""The input contract: what a Pub/Sub message of an event carries besides its payload."""

from __future__ import annotations

import datetime

EVENT_ID = "event_id"
RECEIVED_AT = "received_at"
EVENT_TYPE = "event_type"

# Timestamps outside this range are refused as bad: before it they are nonsense, and
# after it they would open windows that close in decades.
EARLIEST_MILLIS = 0
LATEST_MILLIS = 4102444800000  # 2100-01-01T00:00:00Z


class BadTimestamp(ValueError):
    """A ``received_at`` that is neither RFC 3339 nor epoch millis in range."""


def parse_received_at(value: str) -> int:
    """Epoch millis from an RFC 3339 string or a decimal count of epoch millis."""
    text = value.strip()
    if text.isdigit() and text.isascii():
        millis = int(text)
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

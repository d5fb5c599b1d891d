"""Independent counts of what was published: where they come from and how they read.

Two sources, chosen per tier (``Tier.audit_source``), both outside the delivery job:

- ``subscription``: the auditor reads its own subscription of the type's topic,
  ``events-<type>-audit``, and counts every message;
- ``producer_counts``: every ``EventPublisher`` reports, about once a minute and on
  flush, how many messages it published per (type, hour of ``received_at``) to one small
  topic, ``events-audit-counts``. Each type's auditor reads its own filtered
  subscription of it, ``events-audit-counts-<type>``.

Both put a message in the hour that delivery puts it in (``bucket_millis``), and the
auditor writes what it counted per hour to ``<storage_root>/audit/<type>/dt=…/hr=…/counts.json``
(``counts_document``).
"""

from __future__ import annotations

import dataclasses
import json

from event_delivery.contract import envelope, partitions
from event_delivery.contract.registry import AUDIT_PRODUCER_COUNTS, AUDIT_SUBSCRIPTION, EventType

COUNTS_TOPIC = "events-audit-counts"
SOURCES = (AUDIT_SUBSCRIPTION, AUDIT_PRODUCER_COUNTS)

# The delivery job's defaults for --late_horizon_seconds and --max_future_seconds: a stamp
# outside these bounds of the message's arrival puts it in the hour of its arrival.
LATE_HORIZON_SECONDS = 7 * 24 * 3600
MAX_FUTURE_SECONDS = 3600

# Distinct ids are counted with Beam's ApproximateUnique sketch (K minimum values) of this
# many hashes: exact up to this many distinct ids per hour, within about 2% above it.
DISTINCT_ID_SAMPLE_SIZE = 10_000


def counts_subscription(event_type: EventType) -> str:
    """The auditor's subscription of the count reports, filtered to one type."""
    return f"{COUNTS_TOPIC}-{event_type.name}"


def auditor_subscription(event_type: EventType, source: str | None = None) -> str:
    """The subscription the type's auditor reads, by ``source`` (default: its tier's audit source):
    its own subscription of the type's topic, or its filtered subscription of the count reports."""
    if (source or event_type.tier.audit_source) == AUDIT_SUBSCRIPTION:
        return event_type.audit_subscription
    return counts_subscription(event_type)


def counts_filter(event_type: EventType) -> str:
    """The Pub/Sub filter of ``counts_subscription`` (the emulator ignores filters; the auditor checks too)."""
    return f'attributes.{envelope.EVENT_TYPE} = "{event_type.name}"'


def bucket_millis(
    attributes: dict,
    arrival_millis: int,
    late_horizon_seconds: int = LATE_HORIZON_SECONDS,
    max_future_seconds: int = MAX_FUTURE_SECONDS,
) -> int:
    """The time that decides a message's hour, as delivery decides it.

    Its ``received_at``; or its arrival (the Pub/Sub publish time) where ``received_at``
    is missing, unparseable, older than the late horizon or too far in the future.
    Delivery dead-letters the last three (``bad_timestamp``) in the arrival's hour.
    """
    raw = (attributes or {}).get(envelope.RECEIVED_AT)
    if raw is None:
        return arrival_millis
    try:
        millis = envelope.parse_received_at(raw)
    except envelope.BadTimestamp:
        return arrival_millis
    if not arrival_millis - late_horizon_seconds * 1000 <= millis <= arrival_millis + max_future_seconds * 1000:
        return arrival_millis
    return millis


def hour_start_seconds(millis: int, window_seconds: int) -> int:
    """The start of the hour (bucket of ``window_seconds``) that holds ``millis``."""
    seconds = millis // 1000
    return seconds - seconds % window_seconds


iso = partitions.iso_utc


@dataclasses.dataclass(frozen=True)
class CountReport:
    """One producer's count of what it published to a type in one hour, so far.

    Counts are cumulative per (producer, hour) and ``sequence`` grows with every report a
    producer sends, so the auditor keeps each producer's latest report per hour: a report
    that Pub/Sub delivers twice, late or out of order changes nothing, and a lost one is
    made good by the next.
    """

    event_type: str
    producer_id: str
    sequence: int
    window_seconds: int
    hour_start: int  # epoch seconds
    published: int
    distinct_ids: int

    def encode(self) -> tuple[bytes, dict[str, str]]:
        """The message: JSON data, and the type as an attribute for the subscriptions' filters."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode("utf-8"), {
            envelope.EVENT_TYPE: self.event_type
        }

    @classmethod
    def decode(cls, data: bytes) -> CountReport:
        """Raises ``ValueError`` for anything that is not a report."""
        try:
            fields = json.loads(data.decode("utf-8"))
            report = cls(**{field.name: fields[field.name] for field in dataclasses.fields(cls)})
        except (UnicodeDecodeError, AttributeError, KeyError, TypeError) as error:
            raise ValueError(f"not a count report: {error}") from None
        numbers = (report.sequence, report.window_seconds, report.hour_start, report.published, report.distinct_ids)
        if not all(isinstance(n, int) and n >= 0 for n in numbers) or report.window_seconds == 0:
            raise ValueError("not a count report: a count is not a non-negative integer")
        return report


def counts_document(
    event_type: str, hour_start: int, window_seconds: int, published: int, distinct_ids: int, source: str, written_at
) -> dict:
    """``counts.json``: what the auditor counted of an hour."""
    return {
        "event_type": event_type,
        "hour_start": iso(hour_start),
        "hour_end": iso(hour_start + window_seconds),
        "published": published,
        "distinct_ids": distinct_ids,
        "source": source,
        "written_at": iso(written_at),
    }

"""Publish events in the input contract's form: JSON data plus the envelope attributes.

As a library::

    publisher = EventPublisher("local-project", get_event_type("play"))
    publisher.publish({"user_id": "u1", ...})
    publisher.flush()

As a command, one JSON object per line on stdin::

    echo '{"service": "login", ...}' | \\
        python -m event_delivery.producer --project local-project --event_type service_log

Every publisher also counts what it publishes, per hour of ``received_at`` (buckets of
``window_seconds``, as the delivery job's), and reports those counts about once a minute
and on ``flush`` to the ``events-audit-counts`` topic: the auditor's source of what was
published for the tiers that are too busy for a second subscription (see
``event_delivery.contract.counts``). A report that cannot be sent is logged and retried
with the next one; it never fails the events.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import threading
import time
import uuid
import weakref

from apache_beam.coders import StrUtf8Coder
from apache_beam.transforms.stats import ApproximateUniqueCombineFn

from event_delivery.cloud import clients, preflight
from event_delivery.contract import counts, envelope
from event_delivery.contract.partitions import HOUR_SECONDS, check_window_seconds
from event_delivery.contract.registry import EventType, load_registry

REPORT_SECONDS = 60
_LOG = logging.getLogger(__name__)


def attributes_for(event_type: EventType, event_id: str, received_at_millis: int) -> dict[str, str]:
    return {
        envelope.EVENT_ID: event_id,
        envelope.RECEIVED_AT: envelope.format_received_at(received_at_millis),
        envelope.EVENT_TYPE: event_type.name,
    }


def stamp(
    event_type: EventType, fields: dict, event_id: str | None = None, received_at_millis: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """The message of an event, as every door publishes it: ``fields`` as compact JSON, and the
    envelope attributes, with a new ``event_id`` unless given and ``received_at`` now unless given."""
    event_id = event_id or str(uuid.uuid4())
    received_at_millis = int(time.time() * 1000) if received_at_millis is None else received_at_millis
    data = json.dumps(fields, separators=(",", ":")).encode("utf-8")
    return data, attributes_for(event_type, event_id, received_at_millis)


@dataclasses.dataclass
class _HourTally:
    published: int = 0
    distinct_before: int = 0  # distinct ids counted by sketches since dropped (see PublishedCounts.prune)
    ids: object = None  # the sketch of this hour's ids while the hour may still take events


class PublishedCounts:
    """What one producer published to one type, per hour of ``received_at``: its count reports.

    Distinct ids are counted with the same sketch as the auditor's (exact up to
    ``DISTINCT_ID_SAMPLE_SIZE`` per hour), so a producer's memory per hour is bounded
    whatever its volume. An hour's sketch is dropped once the hour is past its tier's
    allowed lateness; an id published again after that counts as distinct once more.
    Counts are kept for the late horizon, so every report of an hour only grows.
    """

    def __init__(self, event_type: EventType, window_seconds: int, producer_id: str | None = None):
        check_window_seconds(window_seconds)
        self.event_type = event_type
        self.window_seconds = window_seconds
        self.producer_id = producer_id or uuid.uuid4().hex
        self.sketch = ApproximateUniqueCombineFn(counts.DISTINCT_ID_SAMPLE_SIZE, StrUtf8Coder())
        self.hours: dict[int, _HourTally] = {}
        self.changed: set[int] = set()
        self.sequence = 0
        self.lock = threading.Lock()

    def hour_of(self, attributes: dict, now_millis: int) -> int:
        """The hour a message publishing now belongs to; its arrival stands in for a bad stamp."""
        return counts.hour_start_seconds(counts.bucket_millis(attributes, now_millis), self.window_seconds)

    def add(self, hour: int, event_id: str | None) -> None:
        with self.lock:
            tally = self.hours.setdefault(hour, _HourTally())
            tally.published += 1
            if event_id:
                if tally.ids is None:
                    tally.ids = self.sketch.create_accumulator()
                self.sketch.add_input(tally.ids, event_id)
            self.changed.add(hour)

    def remove(self, hour: int) -> None:
        """Takes back a message that Pub/Sub did not accept (its id stays counted)."""
        with self.lock:
            self.hours[hour].published -= 1
            self.changed.add(hour)

    def mark_changed(self, hour: int) -> None:
        with self.lock:
            if hour in self.hours:
                self.changed.add(hour)

    def reports(self, now: float | None = None) -> list[counts.CountReport]:
        """The cumulative counts of every hour that changed since the last reports."""
        with self.lock:
            self.sequence += 1
            reports = [self._report(hour) for hour in sorted(self.changed)]
            self.changed.clear()
            self.prune(time.time() if now is None else now)
        return reports

    def _report(self, hour: int) -> counts.CountReport:
        tally = self.hours[hour]
        distinct = tally.distinct_before + (0 if tally.ids is None else self.sketch.extract_output(tally.ids))
        name, sequence, window = self.event_type.name, self.sequence, self.window_seconds
        return counts.CountReport(name, self.producer_id, sequence, window, hour, tally.published, distinct)

    def prune(self, now: float) -> None:
        lateness = self.event_type.tier.allowed_lateness_seconds
        for hour, tally in list(self.hours.items()):
            end = hour + self.window_seconds
            if hour not in self.changed and end + counts.LATE_HORIZON_SECONDS < now:
                del self.hours[hour]
            elif tally.ids is not None and end + lateness < now:
                tally.distinct_before += self.sketch.extract_output(tally.ids)
                tally.ids = None


def _report_periodically(publisher_ref, stop: threading.Event, seconds: float) -> None:
    """Sends a publisher's count reports every ``seconds`` until it is closed or gone."""
    while not stop.wait(seconds):
        publisher = publisher_ref()
        if publisher is None:
            return
        publisher.report_counts()
        del publisher


class EventPublisher:
    """Publishes one type's events to its topic, batching like any Pub/Sub client.

    It counts what Pub/Sub accepted per hour of ``received_at`` (``window_seconds`` long,
    as in the delivery and auditor jobs) and reports it every ``report_seconds`` and on
    ``flush`` to the ``events-audit-counts`` topic.
    """

    def __init__(
        self,
        project: str,
        event_type: EventType,
        publisher=None,
        window_seconds: int = HOUR_SECONDS,
        report_seconds: float = REPORT_SECONDS,
    ):
        self.event_type = event_type
        self.client = publisher or clients.publisher_client()
        self.topic = self.client.topic_path(project, event_type.topic)
        self.counts_topic = self.client.topic_path(project, counts.COUNTS_TOPIC)
        self.pending = []
        self.counts = PublishedCounts(event_type, window_seconds)
        self.report_seconds = report_seconds
        self.sent_reports = []
        self.report_failures = 0
        self._reports_lock = threading.Lock()
        self._stop_reports = threading.Event()
        self._reporter = None

    def publish(self, fields: dict, event_id: str | None = None, received_at_millis: int | None = None) -> str:
        """Publishes an event, stamping ``received_at`` now unless given; returns its id.

        A retry must reuse the returned ``event_id``: that is how delivery deduplicates.
        """
        data, attributes = stamp(self.event_type, fields, event_id, received_at_millis)
        self.publish_raw(data, attributes)
        return attributes[envelope.EVENT_ID]

    def publish_raw(self, data: bytes, attributes: dict[str, str]) -> None:
        """Publishes exactly these bytes and attributes (the load generator's malformed input)."""
        hour = self.counts.hour_of(attributes, int(time.time() * 1000))
        future = self.client.publish(self.topic, data, **attributes)
        self.counts.add(hour, attributes.get(envelope.EVENT_ID))
        self.pending.append((future, hour))
        if self._reporter is None and self.report_seconds:
            self._reporter = threading.Thread(
                target=_report_periodically,
                args=(weakref.ref(self), self._stop_reports, self.report_seconds),
                name=f"count-reports-{self.event_type.name}",
                daemon=True,
            )
            self._reporter.start()

    def report_counts(self, wait: bool = False) -> int:
        """Sends the count reports of the hours that changed since the last ones; returns how many.

        A report Pub/Sub refused is logged, and its hour is reported again next time:
        reports are cumulative, so the next one makes it good.
        """
        reports = self.counts.reports()
        with self._reports_lock:
            for report in reports:
                data, attributes = report.encode()
                self.sent_reports.append(
                    (self.client.publish(self.counts_topic, data, **attributes), report.hour_start)
                )
            sent, self.sent_reports = self.sent_reports, []
        for future, hour in sent:
            if not (wait or future.done()):
                with self._reports_lock:
                    self.sent_reports.append((future, hour))
                continue
            try:
                future.result(timeout=60)
            except Exception as error:  # never fails the events; the next report carries the totals
                self.report_failures += 1
                self.counts.mark_changed(hour)
                _LOG.warning("a count report to %s was not accepted: %s", self.counts_topic, error)
        return len(reports)

    def flush(self) -> int:
        """Waits until everything published so far is accepted and its counts are reported;
        returns how many events were accepted."""
        done = len(self.pending)
        failed = None
        for future, hour in self.pending:
            try:
                future.result(timeout=60)
            except Exception as error:  # raised below, once the counts no longer hold the message
                self.counts.remove(hour)
                failed = failed or error
        self.pending.clear()
        self.report_counts(wait=True)
        if failed is not None:
            raise failed
        return done

    def close(self) -> None:
        """Stops the periodic reports (``flush`` first to send the last)."""
        self._stop_reports.set()


def main(argv=None) -> int:
    registry = load_registry()
    parser = argparse.ArgumentParser(prog="python -m event_delivery.producer", description=__doc__.split("\n")[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--event_type", required=True, choices=sorted(registry))
    parser.add_argument(
        "--window_seconds",
        type=int,
        default=HOUR_SECONDS,
        help="The hours of the count reports: the delivery and auditor jobs' --window_seconds. Default: 3600.",
    )
    args = parser.parse_args(argv)
    with preflight.exit_on_failure(parser.prog):
        preflight.check_topic(f"projects/{args.project}/topics/{registry[args.event_type].topic}")
    try:
        check_window_seconds(args.window_seconds)
    except ValueError as error:
        parser.error(str(error))
    publisher = EventPublisher(args.project, registry[args.event_type], window_seconds=args.window_seconds)
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as error:
            print(f"error: line {number} is not JSON: {error.msg}", file=sys.stderr)
            return 2
        print(publisher.publish(fields))
    publisher.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

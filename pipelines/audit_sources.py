"""The auditor's two sources, each counted per hour as delivery closes it.

- ``CountMessages``, source ``subscription``: its own subscription of the type's topic,
  ``events-<type>-audit``. Every message counts, invalid ones too, in the hour delivery
  puts it in: its ``received_at``, or its publish time where that is missing, unparseable
  or out of bounds (``event_delivery.contract.counts.bucket_millis``). Only attributes are
  read, never the payload. Distinct ids are Beam's ``ApproximateUnique`` sketch, combined
  per hour (``docs/operations.md`` says why).
- ``SumCountReports``, source ``producer_counts``: the count reports every
  ``EventPublisher`` sends about once a minute and on flush (cumulative per producer and
  hour) to the ``events-audit-counts`` topic, read through ``events-audit-counts-<type>``,
  a subscription filtered to the type (the emulator ignores filters, so the job checks the
  type too). Per hour it adds up each producer's latest report: a report delivered twice
  or out of order changes nothing. Distinct ids are then each producer's own count, summed
  (an id that two producers both publish counts twice).

Both emit ``(hour_start, HourCounts)`` when the hour closes, and again with the new totals
``trigger_seconds`` after a late message.
"""

from __future__ import annotations

import typing

import apache_beam as beam
from apache_beam.coders import StrUtf8Coder
from apache_beam.metrics import Metrics
from apache_beam.transforms import trigger, window
from apache_beam.transforms.stats import ApproximateUniqueCombineFn

from event_delivery.contract import counts, envelope, slo
from event_delivery.contract.hours import into_hours
from pipelines.auditor_settings import AuditSettings


class HourCounts(typing.NamedTuple):
    published: int
    distinct_ids: int


def counted_at_close(settings: AuditSettings) -> beam.WindowInto:
    """Into the hours; one pane when the hour closes, and one with the new totals
    ``trigger_seconds`` after a late message."""
    late = trigger.AfterProcessingTime(settings.trigger_seconds)
    return into_hours(settings, trigger.AfterWatermark(late=late), accumulating=True)


class HourOfMessageFn(beam.DoFn):
    """A message as ``(hour_start, event_id or "")``, stamped with the time that decides its hour."""

    def __init__(self, settings: AuditSettings):
        self.window_seconds = settings.window_seconds
        self.late_horizon_seconds = settings.late_horizon_seconds
        self.max_future_seconds = settings.max_future_seconds

    def process(self, message, timestamp=beam.DoFn.TimestampParam):
        attributes = message.attributes or {}
        published = message.publish_time
        # A Pub/Sub read stamps each element with its publish time, where a reader leaves it unset.
        arrival = timestamp.micros // 1000 if published is None else int(published.timestamp() * 1000)
        millis = counts.bucket_millis(attributes, arrival, self.late_horizon_seconds, self.max_future_seconds)
        hour = counts.hour_start_seconds(millis, self.window_seconds)
        yield window.TimestampedValue((hour, attributes.get(envelope.EVENT_ID) or ""), millis / 1000)


class PublishedCountsFn(beam.CombineFn):
    """Event ids in; ``HourCounts``: every message, and the distinct non-empty ids (a sketch)."""

    def __init__(self, sample_size: int = counts.DISTINCT_ID_SAMPLE_SIZE):
        self.ids = ApproximateUniqueCombineFn(sample_size, StrUtf8Coder())

    def create_accumulator(self):
        return [0, self.ids.create_accumulator()]

    def add_input(self, accumulator, event_id):
        accumulator[0] += 1
        if event_id:
            self.ids.add_input(accumulator[1], event_id)
        return accumulator

    def merge_accumulators(self, accumulators):
        accumulators = list(accumulators)
        merged = self.ids.merge_accumulators([ids for _, ids in accumulators])
        return [sum(messages for messages, _ in accumulators), merged]

    def extract_output(self, accumulator):
        return HourCounts(accumulator[0], self.ids.extract_output(accumulator[1]))


class CountMessages(beam.PTransform):
    """Pub/Sub messages in; ``(hour_start, HourCounts)`` out when each hour closes, and again after late ones."""

    def __init__(self, settings: AuditSettings):
        super().__init__()
        self.settings = settings

    def expand(self, messages):
        return (
            messages
            | "HourOfMessage" >> beam.ParDo(HourOfMessageFn(self.settings))
            | "IntoHours" >> counted_at_close(self.settings)
            | "CountPerHour" >> beam.CombinePerKey(PublishedCountsFn())
        )


class ParseReportFn(beam.DoFn):
    """A count report as ``(hour_start, report)``, stamped with its hour; others are counted and dropped."""

    def __init__(self, settings: AuditSettings):
        self.event_type = settings.event_type.name
        self.window_seconds = settings.window_seconds

    def setup(self):
        self.malformed = Metrics.counter(slo.AUDIT_NAMESPACE, "malformed_count_reports")
        self.other_windows = Metrics.counter(slo.AUDIT_NAMESPACE, "count_reports_of_other_window_seconds")

    def process(self, message):
        try:
            report = counts.CountReport.decode(message.data)
        except ValueError:
            report = None
            self.malformed.inc()
        if report is None or report.event_type != self.event_type:
            pass  # not a report, or another type's: the emulator does not apply the subscription's filter
        elif report.window_seconds != self.window_seconds:
            # A producer that buckets otherwise cannot be added up: its counts are missing,
            # so the hour shows fewer published than delivered, and the audit fails.
            self.other_windows.inc()
        else:
            yield window.TimestampedValue((report.hour_start, report), report.hour_start)


class LatestReportsFn(beam.CombineFn):
    """Count reports of one hour in; ``HourCounts``: each producer's latest report, added up."""

    def create_accumulator(self):
        return {}

    def add_input(self, latest, report):
        known = latest.get(report.producer_id)
        if known is None or report.sequence > known[0]:
            latest[report.producer_id] = (report.sequence, report.published, report.distinct_ids)
        return latest

    def merge_accumulators(self, accumulators):
        merged = {}
        for latest in accumulators:
            for producer, entry in latest.items():
                if producer not in merged or entry[0] > merged[producer][0]:
                    merged[producer] = entry
        return merged

    def extract_output(self, latest):
        return HourCounts(sum(e[1] for e in latest.values()), sum(e[2] for e in latest.values()))


class SumCountReports(beam.PTransform):
    """Count-report messages in; ``(hour_start, HourCounts)`` out when each hour closes, and again after late ones."""

    def __init__(self, settings: AuditSettings):
        super().__init__()
        self.settings = settings

    def expand(self, messages):
        return (
            messages
            | "ParseReports" >> beam.ParDo(ParseReportFn(self.settings))
            | "IntoHours" >> counted_at_close(self.settings)
            | "AddUpProducers" >> beam.CombinePerKey(LatestReportsFn())
        )

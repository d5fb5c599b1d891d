"""The auditor's last steps: write each hour's ``counts.json``, then, a close margin later,
check it against what delivery accounted for and count what is in no output as ``audit/lost``."""

from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import counts, partitions, slo
from event_delivery.contract.partitions import Layout
from pipelines.auditor_settings import AuditSettings

_LOG = logging.getLogger(__name__)


class WriteCountsFn(beam.DoFn):
    """Writes an hour's ``counts.json``; passes on the counts it wrote.

    Panes carry running totals, so a pane with fewer messages than the file already holds
    is an older one, come late: it is not written.
    """

    def __init__(self, settings: AuditSettings):
        self.layout = settings.layout
        self.source = settings.source

    def setup(self):
        use_emulator_credentials()
        self.published = Metrics.counter(slo.AUDIT_NAMESPACE, slo.PUBLISHED)

    def process(self, hour_counts):
        hour_start, counted = hour_counts
        path = self.layout.audit_counts(hour_start)
        before = files.read_json(path)["published"] if files.exists(path) else 0
        if counted.published < before:
            return
        document = counts.counts_document(
            self.layout.event_type,
            hour_start,
            self.layout.window_seconds,
            counted.published,
            counted.distinct_ids,
            self.source,
            Timestamp.now().micros / 1e6,
        )
        files.write_json(path, document)
        self.published.inc(counted.published - before)
        yield hour_counts


def accounted_for(layout: Layout, hour_start: int) -> int | None:
    """Messages of the hour that delivery accounted for: delivered and duplicates (its
    ``_SUCCESS``), the records under the late and dead-letter roots, and the repeats dropped
    after the close. None before the marker."""
    marker = layout.marker(hour_start)
    if not files.exists(marker):
        return None
    accounting = files.read_json(marker)["accounting"]
    written = 0
    for root in (layout.late, layout.dead_letter):
        written += sum(
            files.count_avro_records(p) for p in files.glob(partitions.join(layout.hour(root, hour_start), "*.avro"))
        )
    return accounting["delivered"] + accounting["duplicates"] + written + partitions.late_duplicates(layout, hour_start)


class CheckLostFn(beam.DoFn):
    """``check_delay_seconds`` after an hour's counts are written, compares them with what
    delivery accounted for; yields ``(hour_start, messages)`` newly found lost, each once.

    An hour without its marker by then is not checked here: it is overdue, which the
    delivery job's metrics and ``make audit`` report.
    """

    PUBLISHED = ReadModifyWriteStateSpec("published", VarIntCoder())
    REPORTED = ReadModifyWriteStateSpec("reported_lost", VarIntCoder())
    CHECK = TimerSpec("check", TimeDomain.REAL_TIME)

    def __init__(self, settings: AuditSettings):
        self.layout = settings.layout
        self.delay_seconds = settings.check_delay_seconds

    def setup(self):
        use_emulator_credentials()

    def process(
        self,
        hour_counts,
        published=beam.DoFn.StateParam(PUBLISHED),
        check=beam.DoFn.TimerParam(CHECK),
    ):
        published.write(hour_counts[1].published)
        check.set(Timestamp.now() + Duration(seconds=self.delay_seconds))

    @on_timer(CHECK)
    def check_hour(
        self,
        hour_start=beam.DoFn.KeyParam,
        published=beam.DoFn.StateParam(PUBLISHED),
        reported=beam.DoFn.StateParam(REPORTED),
    ):
        accounted = accounted_for(self.layout, hour_start)
        name, hour = self.layout.event_type, counts.iso(hour_start)
        if accounted is None:
            _LOG.warning("%s %s: no _SUCCESS marker %ss after the hour closed", name, hour, self.delay_seconds)
            return
        lost = published.read() - accounted
        if lost:
            _LOG.warning("%s %s: published %d, accounted for %d", name, hour, published.read(), accounted)
        already = reported.read() or 0
        if lost > already:
            reported.write(lost)
            yield hour_start, lost - already


class CountLostFn(beam.DoFn):
    """The ``audit/lost`` counter. A step of its own: the local runner drops what a timer counts."""

    def setup(self):
        self.lost = Metrics.counter(slo.AUDIT_NAMESPACE, slo.LOST)

    def process(self, newly_lost):
        self.lost.inc(newly_lost[1])

"""The steps that publish a planned hour (``transforms.publish``): the index of its ids first, then its
parts, then its marker.

``CloseHour`` sends the hour's plan on as the read tasks of its index and the count of its buckets. The
read tasks are spread over the workers and each chunk's ids shuffled to groups of buckets
(``transforms.index_buckets``), whose keys write the index and list the hour's later copies of ids
(``transforms.close_repeats``). Once the last bucket is written, the hour's parts go out, spread over the
workers too (else they would run where the close ran, one after another), each less its later copies.
Once the last part is written, the hour is published, keyed by hour. An hour is counted twice, so, each on
its own key: a runner runs one key's work items one at a time, and commits each with its state.
"""

from __future__ import annotations

import logging
import time
import typing

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import GlobalWindows

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions, slo
from event_delivery.contract.partitions import Layout
from transforms.declared_types import ANY_OUTPUT
from transforms.index_buckets import GROUP_KEY, ReadIndexChunkFn, WriteIndexBucketFn
from transforms.publish import PLANNED, WRITTEN, finish_hour, parts_to_write, plan_path, planned_sources, write_part

_LOG = logging.getLogger(__name__)
PARTS = "parts"
wall_clock = time.time  # module-level, so that a test can set the clock of the close delay


def all_written(progress: tuple, planned, written) -> bool:
    """Counts ``(PLANNED, writes)`` and ``(WRITTEN, writes)`` in a key's ``planned`` and ``written`` cells;
    True once every planned write was written, and then the cells are cleared."""
    kind, count = progress
    if kind == PLANNED:
        planned.write(count)
    else:
        written.write((written.read() or 0) + count)
    done = planned.read() is not None and (written.read() or 0) >= planned.read()
    if done:
        planned.clear()
        written.clear()
    return done


class WritePartsWhenIndexedFn(beam.DoFn):
    """``(hour start, (PLANNED, buckets))`` from ``CloseHour`` and ``(hour start, (WRITTEN, buckets))`` from
    the index's keys in; once every bucket of the hour is written, its parts out (``PARTS``, ``(hour start,
    part)``) and ``(hour start, (PLANNED, parts))``. An hour published meanwhile (its plan gone: another
    run's close, or a try whose commit was lost) sends none."""

    BUCKETS = ReadModifyWriteStateSpec("buckets", VarIntCoder())
    INDEXED = ReadModifyWriteStateSpec("indexed", VarIntCoder())

    def __init__(self, layout: Layout):
        self.layout = layout

    def setup(self):
        use_emulator_credentials()

    def process(self, hour_progress, buckets=beam.DoFn.StateParam(BUCKETS), indexed=beam.DoFn.StateParam(INDEXED)):
        hour_start, progress = hour_progress
        if not all_written(progress, buckets, indexed):
            return
        saved = plan_path(self.layout, hour_start)
        if not files.exists(saved):
            return
        parts = parts_to_write(files.read_json(saved))
        for part in parts:
            yield beam.pvalue.TaggedOutput(PARTS, (hour_start, part))
        yield hour_start, (PLANNED, len(parts))


class WritePartFn(beam.DoFn):
    """``(hour start, part)`` in; ``(hour start, (WRITTEN, 1))`` out once the part is written."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def setup(self):
        use_emulator_credentials()

    def process(self, hour_part):
        hour_start, part = hour_part
        write_part(self.layout, hour_start, part)
        yield hour_start, (WRITTEN, 1)


@ANY_OUTPUT
class PublishWhenWrittenFn(beam.DoFn):
    """Counts an hour's parts written (each ``(WRITTEN, 1)``) against its plan's (``(PLANNED, parts)``);
    when all are written, publishes it."""

    PARTS = ReadModifyWriteStateSpec("parts", VarIntCoder())
    WRITTEN_PARTS = ReadModifyWriteStateSpec("written", VarIntCoder())

    def __init__(self, settings):
        self.layout = settings.layout
        self.tier = settings.event_type.tier
        self.allowed_lateness_seconds = settings.allowed_lateness_seconds
        self.streaming = not settings.bounded

    def setup(self):
        use_emulator_credentials()
        self.delivered = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.DELIVERED)
        self.closed_hours = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.HOURS_CLOSED)
        self.close_delay = beam.metrics.Metrics.distribution(slo.NAMESPACE, slo.CLOSE_DELAY_SECONDS)
        self.overdue = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.HOURS_OVERDUE)

    def process(self, hour_progress, parts=beam.DoFn.StateParam(PARTS), written=beam.DoFn.StateParam(WRITTEN_PARTS)):
        hour_start, progress = hour_progress
        if not all_written(progress, parts, written):
            return
        manifest = finish_hour(self.layout, hour_start)
        self.delivered.inc(manifest["accounting"]["delivered"])
        self.closed_hours.inc()
        if self.streaming:  # a backfill closes hours of the past: its delay says nothing
            self._measure_timeliness(hour_start)
        _LOG.info(
            "closed %s %s: %d records in %d files",
            self.layout.event_type,
            partitions.iso_utc(hour_start),
            manifest["accounting"]["delivered"],
            len(manifest["files"]),
        )
        yield self.layout.marker(hour_start)

    def _measure_timeliness(self, hour_start: int) -> None:
        delay = wall_clock() - (hour_start + self.layout.window_seconds)
        self.close_delay.update(int(delay))
        if slo.is_overdue(self.tier, delay, self.allowed_lateness_seconds):
            self.overdue.inc()


PROGRESS = tuple[int, typing.Any]  # (hour start, progress): a deterministic key


class PublishHours(beam.PTransform):
    """Planned hours in, as ``CloseHour`` emits them: ``index_tasks`` (``(hour start, read task)``) and
    ``planned`` (``(hour start, (PLANNED, buckets))``); marker paths out, in the global window."""

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def expand(self, planned_hours):
        layout = self.settings.layout
        # Out of the hour windows: an hour's elements carry their close time, which a window
        # function would put in the next hour (a reshuffle windows again), and state kept per
        # hour key is dropped once the hour is published.
        buckets = (
            planned_hours["index_tasks"]
            | "IndexTasksOutOfTheirHours" >> beam.WindowInto(GlobalWindows())
            | "SpreadIndexTasks" >> beam.Reshuffle()
            | "ReadIndexChunks" >> beam.ParDo(ReadIndexChunkFn(layout, planned_sources)).with_output_types(GROUP_KEY)
            | "WriteIndexBuckets" >> beam.ParDo(WriteIndexBucketFn(layout))
            | "BucketsWritten" >> beam.MapTuple(lambda hour_start, written: (hour_start, (WRITTEN, written)))
        )
        planned = planned_hours["planned"] | "PlansOutOfTheirHours" >> beam.WindowInto(GlobalWindows())
        indexed = (
            (planned, buckets)
            | "PlansAndBuckets" >> beam.Flatten().with_output_types(PROGRESS)
            | "PartsWhenIndexed" >> beam.ParDo(WritePartsWhenIndexedFn(layout)).with_outputs(PARTS, main="planned")
        )
        written = indexed[PARTS] | "SpreadParts" >> beam.Reshuffle() | "WriteParts" >> beam.ParDo(WritePartFn(layout))
        return (
            (indexed.planned, written)
            | "PartsPlannedAndWritten" >> beam.Flatten().with_output_types(PROGRESS)
            | "PublishWhenWritten" >> beam.ParDo(PublishWhenWrittenFn(self.settings))
        )

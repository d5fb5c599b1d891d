"""Deduplicate by event id within (type, hour), across all panes of the hour.

A streaming job sees an hour in many panes. ``MarkRepeats`` keeps one state cell per
(id, hour), keyed by the id, so each event reads and writes only its own cell however
full the hour is, and the work spreads over as many keys as there are ids. It marks
every copy after the first; ``GatherPanes`` (``transforms.stream_panes``), per (hour, shard,
writer), drops the marked copies before the hour closes and after, when the rest goes to the
late root. Copies that runs stopped mid-hour staged, and this run's copies of the same ids,
are all staged, and the close keeps the first of each id (``transforms.close_repeats``). A
cell lives until one window after its hour closed, and until the close has published the hour
(``HourPublished``), so a repeat that comes that late is still counted as a duplicate
rather than written again. A repeat that comes later still reaches the late path
unmarked, which drops it against the index of ids that the close left beside the hour
(``transforms.late``): delivered and late together hold each id once for the whole late
horizon, and no cell outlives the publication of its hour by more than a window.
A bounded job (a backfill) sees each (hour, shard) in exactly one pane, so the pane
alone decides and no state is kept: a runner can then spread the shards over its
workers (the local runner runs a stateful step on one worker only).
"""

from __future__ import annotations

import logging

import apache_beam as beam
from apache_beam.coders import StrUtf8Coder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions, slo
from transforms.declared_types import ANY_OUTPUT
from transforms.hours import bucket_start_seconds, hour_windows
from transforms.published_hours import HourPublished
from transforms.reports import DUPLICATES, report

_LOG = logging.getLogger(__name__)
LATE_PANES = "late"  # the output of panes that came after their hour closed (not the report kind)
REPEAT = "repeat"  # the mark ``MarkRepeats`` appends to every copy of an id after the first
DELIVERED_HERE = ""  # an id's cell once this run let its first copy through


def is_repeat(event) -> bool:
    """Whether ``MarkRepeats`` marked the encoded event (``transforms.records``) as a repeat."""
    return len(event) > 4


class MarkRepeatsFn(beam.DoFn):
    """Marks every copy of an id after the first in its hour, with one state cell per (id, hour).

    The cell is empty until this run lets a copy through (``DELIVERED_HERE``). A copy that finds
    a cell is a repeat: it goes on marked, without its record, only to be counted.

    The cell lives until one window after the hour closes, and then until the hour is
    published (``HourPublished``), asked again after one window, two, four and so on. A copy
    that arrives after that finds none and is not marked: the late path checks it against the
    index the close left (``transforms.late``).
    """

    SEEN = ReadModifyWriteStateSpec("first_copy", StrUtf8Coder())
    FORGET = TimerSpec("forget", TimeDomain.WATERMARK)

    def __init__(self, settings):
        self.remember = Duration(seconds=settings.window_seconds)
        self.settings = settings

    def setup(self):
        self.published = HourPublished(self.settings)
        self.kept_unpublished = beam.metrics.Metrics.counter(slo.NAMESPACE, "cells_kept_for_unpublished_hours")

    def process(
        self,
        keyed_event,
        window=beam.DoFn.WindowParam,
        seen=beam.DoFn.StateParam(SEEN),
        forget=beam.DoFn.TimerParam(FORGET),
    ):
        event_id, event = keyed_event
        if seen.read() is not None:  # counted downstream, never written: its record goes no further
            event_id, received_at, _, forgotten = event
            yield (event_id, received_at, b"", forgotten, REPEAT)
            return
        seen.write(DELIVERED_HERE)
        forget.set(window.end + self.remember)
        yield event

    @on_timer(FORGET)
    def forget_id(
        self,
        fired_at=beam.DoFn.TimestampParam,
        window=beam.DoFn.WindowParam,
        seen=beam.DoFn.StateParam(SEEN),
        forget=beam.DoFn.TimerParam(FORGET),
    ):
        if self.published.may_forget(bucket_start_seconds(window), fired_at.micros / 1e6):
            seen.clear()
        else:  # the close lags this step: ask again, each time twice as late
            self.kept_unpublished.inc()
            forget.set(fired_at + max(self.remember, fired_at - window.end))


def _keyed_in_its_hour(event) -> TimestampedValue:
    """``(event_id, event)``, stamped with its ``received_at``, which decides its hour."""
    return TimestampedValue((event[0], event), event[1] / 1000)


class MarkRepeats(beam.PTransform):
    """Encoded events in (``transforms.records``), the same out, repeats marked (see ``MarkRepeatsFn``).

    ``settings`` are the job's ``DeliverySettings``: its hours, lateness and staging.
    """

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def expand(self, events):
        return (
            events
            | "KeyById" >> beam.Map(_keyed_in_its_hour)
            | "IntoHours" >> hour_windows(self.settings)
            | "MarkRepeatedIds" >> beam.ParDo(MarkRepeatsFn(self.settings))
        )


def keep_first_copies(events: list, seen: set) -> list:
    """The events whose id is not in ``seen``, first copy only; their ids are added to ``seen``."""
    unique = []
    for event in events:
        event_id = event[0]
        if event_id not in seen:
            seen.add(event_id)
            unique.append(event)
    return unique


def staged_by_earlier_runs(settings, window, shard: int) -> list[str]:
    """Ids in the shard's files that earlier runs staged for the hour and never published."""
    layout = settings.layout
    folder = layout.hour(layout.staging, bucket_start_seconds(window))
    paths = partitions.shard_files_of_other_runs(folder, layout.event_type, settings.run_id, shard)
    return [event_id for path in paths for event_id in files.read_event_ids(path)]


def _count_duplicates(counter, duplicates: int):
    if duplicates:
        counter.inc(duplicates)
        yield beam.pvalue.TaggedOutput(DUPLICATES, report(DUPLICATES, duplicates))


@ANY_OUTPUT
class DeduplicateBoundedPaneFn(beam.DoFn):
    """Keeps the first copy of each id in a pane that holds the whole of its (hour, shard),
    as a bounded input's one pane does, and counts the others. No pane can come after
    it, so none is late, and no state is kept.

    What earlier runs staged for the hour counts as seen (a backfill of an hour a stream left open).
    """

    def __init__(self, settings):
        self.settings = settings

    def default_label(self):
        return "DeduplicateWholeHourFn"  # the step name from before the rename: a job's steps keep their names

    def setup(self):
        self.duplicates = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.DUPLICATES)
        use_emulator_credentials()

    def process(self, pane_elements, window=beam.DoFn.WindowParam):
        (shard, writer), events = pane_elements
        unique = keep_first_copies(events, set(staged_by_earlier_runs(self.settings, window, shard)))
        if unique:
            yield (shard, writer, 0), unique
        yield from _count_duplicates(self.duplicates, len(events) - len(unique))


class Deduplicate(beam.PTransform):
    """A bounded input's ``((shard, writer), [events])`` panes in, one per hour and shard; ``duplicates``
    reports out, and ``unique`` panes, ``((shard, writer, 0), [events])``, none empty; ``late``, always empty.
    (A stream's panes are gathered and deduplicated by ``transforms.stream_panes.GatherPanes``.)

    ``settings`` are the job's ``DeliverySettings``: where panes are staged, and the run.
    """

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def expand(self, panes):
        dedup = beam.ParDo(DeduplicateBoundedPaneFn(self.settings))
        return panes | "DropRepeatedIds" >> dedup.with_outputs(DUPLICATES, LATE_PANES, main="unique")

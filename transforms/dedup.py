"""Deduplicate by event id within (type, hour), across all panes of the hour, and across
restarts of the job before the hour closed.

A streaming job sees an hour in many panes. ``MarkRepeats`` keeps one state cell per
(id, hour), keyed by the id, so each event reads and writes only its own cell however
full the hour is, and the work spreads over as many keys as there are ids. It marks
every copy after the first; ``Deduplicate``, per (hour, shard), drops the marked copies,
before the hour closes and after, when the rest goes to the late root. A cell lives
until one window after its hour closed, so a repeat that comes that late is still
counted as a duplicate rather than written again: delivered and late together hold
each id once. (A repeat that comes later still is written to the late root again.)
A bounded job (a backfill) sees each (hour, shard) in exactly one pane, so the pane
alone decides and no state is kept: a runner can then spread the shards over its
workers (the local runner runs a stateful step on one worker only).
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.coders import BooleanCoder, StrUtf8Coder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions, slo
from transforms.hours import bucket_start_seconds, hour_windows
from transforms.reports import DUPLICATES, report

LATE = "late"
REPEAT = "repeat"  # the mark ``MarkRepeats`` appends to every copy of an id after the first


def is_repeat(event) -> bool:
    return len(event) > 3


def unmarked(events: list) -> list:
    """The events as ``(event_id, received_at_millis, fields)``, marks removed."""
    return [event[:3] if is_repeat(event) else event for event in events]


class MarkRepeatsFn(beam.DoFn):
    """Marks every copy of an id after the first in its hour, with one state cell per (id, hour).

    The cell lives until ``remember_seconds`` after the hour closes. A copy that arrives
    after that finds none and is not marked.
    """

    SEEN = ReadModifyWriteStateSpec("seen", BooleanCoder())
    FORGET = TimerSpec("forget", TimeDomain.WATERMARK)

    def __init__(self, remember_seconds: int):
        self.remember = Duration(seconds=remember_seconds)

    def process(
        self,
        keyed_event,
        window=beam.DoFn.WindowParam,
        seen=beam.DoFn.StateParam(SEEN),
        forget=beam.DoFn.TimerParam(FORGET),
    ):
        _, event = keyed_event
        if seen.read():
            yield (*event, REPEAT)
            return
        seen.write(True)
        forget.set(window.end + self.remember)
        yield event

    @on_timer(FORGET)
    def forget_id(self, seen=beam.DoFn.StateParam(SEEN)):
        seen.clear()


def _keyed_in_its_hour(event) -> TimestampedValue:
    """``(event_id, event)``, stamped with its ``received_at``, which decides its hour."""
    return TimestampedValue((event[0], event), event[1] / 1000)


class MarkRepeats(beam.PTransform):
    """``(event_id, received_at_millis, fields)`` events in, the same out, repeats marked.

    ``settings`` are the job's ``DeliverySettings``: its hours and lateness.
    """

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def expand(self, events):
        s = self.settings
        return (
            events
            | "KeyById" >> beam.Map(_keyed_in_its_hour)
            | "IntoHours" >> hour_windows(s)
            | "MarkRepeatedIds" >> beam.ParDo(MarkRepeatsFn(remember_seconds=s.window_seconds))
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
    return [record["event_id"] for path in paths for record in files.read_avro(path)]


def _count_duplicates(counter, duplicates: int):
    if duplicates:
        counter.inc(duplicates)
        yield beam.pvalue.TaggedOutput(DUPLICATES, report(DUPLICATES, duplicates))


class DeduplicateWholeHourFn(beam.DoFn):
    """Keeps the first copy of each id in a pane that holds the whole of its (hour, shard),
    as a bounded input's one pane does, and counts the others. No pane can come after
    it, so none is late, and no state is kept.

    What earlier runs staged for the hour counts as seen, see ``DeduplicateFn``.
    """

    def __init__(self, settings):
        self.settings = settings

    def setup(self):
        self.duplicates = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.DUPLICATES)
        use_emulator_credentials()

    def process(self, pane_elements, window=beam.DoFn.WindowParam):
        pane_key, events = pane_elements
        unique = keep_first_copies(events, set(staged_by_earlier_runs(self.settings, window, pane_key[0])))
        yield pane_key, unique
        yield from _count_duplicates(self.duplicates, len(events) - len(unique))


class DeduplicateFn(DeduplicateWholeHourFn):
    """Drops the copies ``MarkRepeats`` marked in an hour's shard and counts them.

    A pane that arrives after the watermark closed the hour goes out as ``late``, its
    marked copies dropped and counted too, whatever timing label the runner gave it.

    State is not the ids of this run: those are in ``MarkRepeats``. It is the ids of the
    shard's files that earlier runs staged for the hour and never published, read at the
    first pane of the (hour, shard) in this run, so that a job restarted mid-hour does
    not deliver again what its previous run delivered (the shard count must not change).
    Each pane reads that set, whose size this run's traffic does not change. Everything
    is dropped the moment the hour closes.
    """

    SEEN = BagStateSpec("seen", StrUtf8Coder())
    STARTED = ReadModifyWriteStateSpec("started", BooleanCoder())
    CLOSED = ReadModifyWriteStateSpec("closed", BooleanCoder())
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)

    def process(
        self,
        pane_elements,
        window=beam.DoFn.WindowParam,
        seen=beam.DoFn.StateParam(SEEN),
        started=beam.DoFn.StateParam(STARTED),
        closed=beam.DoFn.StateParam(CLOSED),
        close=beam.DoFn.TimerParam(CLOSE),
    ):
        pane_key, events = pane_elements
        if closed.read():
            late = [e for e in events if not is_repeat(e)]
            yield beam.pvalue.TaggedOutput(LATE, (pane_key, late))
            yield from _count_duplicates(self.duplicates, len(events) - len(late))
            return
        close.set(window.end)
        if not started.read():
            started.write(True)
            for event_id in staged_by_earlier_runs(self.settings, window, pane_key[0]):
                seen.add(event_id)
        unique = keep_first_copies([e for e in events if not is_repeat(e)], set(seen.read()))
        yield pane_key, unique
        yield from _count_duplicates(self.duplicates, len(events) - len(unique))

    @on_timer(CLOSE)
    def close_hour(
        self,
        seen=beam.DoFn.StateParam(SEEN),
        started=beam.DoFn.StateParam(STARTED),
        closed=beam.DoFn.StateParam(CLOSED),
    ):
        seen.clear()
        started.clear()
        closed.write(True)


class Deduplicate(beam.PTransform):
    """``((shard, writer), [events])`` panes in; ``unique`` and ``late`` panes and ``duplicates`` reports out.

    ``settings`` are the job's ``DeliverySettings``: where panes are staged, the run, and
    whether the input is bounded (one pane per hour and shard).
    """

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def expand(self, panes):
        fn = DeduplicateWholeHourFn if self.settings.bounded else DeduplicateFn
        dedup = beam.ParDo(fn(self.settings))
        return panes | "DropRepeatedIds" >> dedup.with_outputs(DUPLICATES, LATE, main="unique")

"""Deduplicate by event id within (type, hour), across all panes of the hour, and across
restarts of the job before the hour closed.

A streaming job sees an hour in many panes, so it keeps the ids seen so far in state.
A bounded job (a backfill) sees each (hour, shard) in exactly one pane, so the pane
alone decides and no state is kept: a runner can then spread the shards over its
workers (the local runner runs a stateful step on one worker only).
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.coders import BooleanCoder, StrUtf8Coder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions
from transforms.hours import bucket_start_seconds
from transforms.reports import DUPLICATES, report

LATE = "late"


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
        self.duplicates = beam.metrics.Metrics.counter("delivery", "duplicates")
        use_emulator_credentials()

    def process(self, pane_elements, window=beam.DoFn.WindowParam):
        shard, events = pane_elements
        unique = keep_first_copies(events, set(staged_by_earlier_runs(self.settings, window, shard)))
        yield shard, unique
        yield from _count_duplicates(self.duplicates, len(events) - len(unique))


class DeduplicateFn(DeduplicateWholeHourFn):
    """Keeps the first copy of each id in an hour's shard and counts the others.

    State is the ids seen in earlier panes of this (hour, shard). It is dropped the
    moment the watermark closes the hour, so a job holds ids only for open hours.
    A pane that arrives after that can no longer be checked against the hour, so
    it goes out as ``late``, whatever timing label the runner gave it.

    The first pane of an (hour, shard) in a run also reads the ids of the shard's files
    that earlier runs staged for the hour and never published: a job restarted mid-hour
    does not deliver again what its previous run delivered (the shard count must not change).
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
        shard, events = pane_elements
        if closed.read():
            yield beam.pvalue.TaggedOutput(LATE, (shard, events))
            return
        close.set(window.end)
        if not started.read():
            started.write(True)
            for event_id in staged_by_earlier_runs(self.settings, window, shard):
                seen.add(event_id)
        unique = keep_first_copies(events, set(seen.read()))
        for event in unique:
            seen.add(event[0])
        yield shard, unique
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
    """``(shard, [events])`` panes in; ``unique`` and ``late`` panes and ``duplicates`` reports out.

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

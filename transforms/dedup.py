"""Deduplicate by event id within (type, hour), across all panes of the hour, and across
restarts of the job before the hour closed."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.coders import BooleanCoder, StrUtf8Coder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer

from event_delivery import files, partitions
from event_delivery.cloud import use_emulator_credentials
from transforms.hours import bucket_start_seconds
from transforms.reports import DUPLICATES, report

LATE = "late"


class DeduplicateFn(beam.DoFn):
    """Keeps the first copy of each id in an hour's shard and counts the others.

    State is the ids seen in earlier panes of this (hour, shard). It is dropped the
    moment the watermark closes the hour, so a job holds ids only for open hours.
    A pane that arrives after that can no longer be checked against the hour, so
    it goes out as ``late``, whatever timing label the runner gave it.

    With a ``staging`` place ``(staging_root, type name, window_seconds, run_id)``, the
    first pane of an (hour, shard) in a run also reads the ids of the shard's files that
    earlier runs staged for the hour and never published: a job restarted mid-hour does
    not deliver again what its previous run delivered (the shard count must not change).
    """

    SEEN = BagStateSpec("seen", StrUtf8Coder())
    STARTED = ReadModifyWriteStateSpec("started", BooleanCoder())
    CLOSED = ReadModifyWriteStateSpec("closed", BooleanCoder())
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)

    def __init__(self, staging=None):
        self.staging = staging

    def setup(self):
        self.duplicates = beam.metrics.Metrics.counter("delivery", "duplicates")
        if self.staging:
            use_emulator_credentials()

    def _staged_by_earlier_runs(self, window, shard: int) -> list[str]:
        if not self.staging:
            return []
        root, name, window_seconds, run_id = self.staging
        folder = partitions.partition_dir(root, name, bucket_start_seconds(window), window_seconds)
        paths = partitions.shard_files_of_other_runs(folder, name, run_id, shard)
        return [record["event_id"] for path in paths for record in files.read_avro(path)]

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
            for event_id in self._staged_by_earlier_runs(window, shard):
                seen.add(event_id)
        earlier = set(seen.read())
        unique = []
        for event in events:
            event_id = event[0]
            if event_id not in earlier:
                earlier.add(event_id)
                seen.add(event_id)
                unique.append(event)
        yield shard, unique
        duplicates = len(events) - len(unique)
        if duplicates:
            self.duplicates.inc(duplicates)
            yield beam.pvalue.TaggedOutput(DUPLICATES, report(DUPLICATES, duplicates))

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

    ``staging`` is where the delivery path stages panes, see ``DeduplicateFn``.
    """

    def __init__(self, staging=None):
        super().__init__()
        self.staging = staging

    def expand(self, panes):
        dedup = beam.ParDo(DeduplicateFn(self.staging))
        return panes | "DropRepeatedIds" >> dedup.with_outputs(DUPLICATES, LATE, main="unique")

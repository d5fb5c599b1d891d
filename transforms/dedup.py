"""Deduplicate by event id within (type, hour): within a pane here, across the hour at its close.

A bounded job (a backfill) sees each (hour, shard) in exactly one pane, so the pane alone decides
(``Deduplicate``) and no state is kept: a runner can then spread the shards over its workers (the
local runner runs a stateful step on one worker only). A stream sees an hour in many panes, of many
writers and perhaps of several runs: ``GatherPanes`` (``transforms.stream_panes``) keeps the first
copy of an id within a pane, every pane is staged, and the hour's close keeps the first copy of each
id across all of them (``transforms.close_repeats``), through the index of the hour's ids that it
leaves beside the hour for the late path (``transforms.late``): delivered and late together hold each
id once for the whole late horizon, and no state per id is kept.
"""

from __future__ import annotations

import apache_beam as beam

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions, slo
from transforms.declared_types import ANY_OUTPUT
from transforms.hours import bucket_start_seconds
from transforms.reports import DUPLICATES, report

LATE_PANES = "late"  # the output of panes that came after their hour closed (not the report kind)


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

"""The close's index of an hour's ids, as steps: each read task's ids shuffled to (hour, shard, group of
buckets) keys, and each group's buckets written once every chunk of its shard was read
(``transforms.id_index``).

No task holds more than a chunk of a shard's files (``IDS_PER_CHUNK`` records), no key more than a group
(``BUCKETS_PER_GROUP`` buckets of ~``IDS_PER_BUCKET`` ids), and no element more than a chunk's ids in one
group, whatever the hour holds. A shard of N ids sends (N / ``IDS_PER_CHUNK``) × (N / ``IDS_PER_BUCKET`` /
``BUCKETS_PER_GROUP``) elements: at 1M events/s, 900 chunks × 1,407 groups per shard-hour, ~20M an hour.
"""

from __future__ import annotations

import typing
from collections.abc import Callable

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder, VarIntCoder
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract.partitions import Layout
from transforms.close_repeats import later_copies, save_later_copies
from transforms.declared_types import ANY_OUTPUT
from transforms.id_index import groups, ids_by_group, task_sources, write_bucket

GROUP_KEY = tuple[tuple[int, int, int], typing.Any]  # (hour start, shard, group): a deterministic key coder
PUBLISHED = None  # what a read task sends for a group once the hour is published: write nothing


def read_index_chunk(layout: Layout, hour_start: int, task: dict, planned_sources: Callable[[], list[str]]) -> list:
    """The ids of one read task's chunk, by group: ``((hour start, shard, group), (chunks, buckets,
    num_shards, entries by bucket))`` for every group of its shard (``id_index.ids_by_group``). Once the
    hour's marker says it is published (by another run, say), nothing is read and every group gets
    ``PUBLISHED``, so that its key still counts every chunk and clears its state, writing nothing."""
    if files.exists(layout.marker(hour_start)):
        shape = (task["chunks"], task["buckets"], task["num_shards"], PUBLISHED)
        return [((hour_start, task["index_of_shard"], group), shape) for group in range(len(groups(task["buckets"])))]
    sources = task_sources(layout.hour(layout.staging, hour_start), task, planned_sources)
    folder = layout.hour(layout.id_index, hour_start)
    return [((hour_start, shard, group), ids) for (shard, group), ids in ids_by_group(folder, task, sources)]


class ReadIndexChunkFn(beam.DoFn):
    """``(hour start, read task)`` in; the chunk's ids by group out (``read_index_chunk``). A task reads its
    own list of files (kilobytes); one of a plan saved before tasks had lists reads the plan's staged files
    with ``planned_sources`` (a task per shard: a read of the plan each)."""

    def __init__(self, layout: Layout, planned_sources: Callable[[Layout, int], list[str]]):
        self.layout = layout
        self.planned_sources = planned_sources

    def setup(self):
        use_emulator_credentials()

    def process(self, hour_task):
        hour_start, task = hour_task
        planned = lambda: self.planned_sources(self.layout, hour_start)  # noqa: E731 - read only if needed
        yield from read_index_chunk(self.layout, hour_start, task, planned)


@ANY_OUTPUT
class WriteIndexBucketFn(beam.DoFn):
    """``((hour start, shard, group), (chunks, buckets, num_shards, entries by bucket))`` in, one from each
    read task of the shard; once all ``chunks`` have sent theirs, the group's buckets are written, then the
    later copies of its ids for the parts to leave out (``close_repeats``), and ``(hour start, buckets
    written)`` goes out: once per group. A key holds its group's entries until then
    (≤ ``BUCKETS_PER_GROUP`` × ~10,000 ids, ~6.5 MB: a bag of one add per chunk, ~900, and one read),
    and none after. A group that heard ``PUBLISHED`` from a chunk writes nothing (the hour's index is
    another run's) and still counts its buckets, so that its hour's key clears too.

    Each read task's output is committed once (Dataflow runs a work item again only if its commit was
    lost), so the count of chunks is exact; a try of the last one whose commit was lost writes the same
    files again, from the same state."""

    ENTRIES = BagStateSpec("entries", FastPrimitivesCoder())
    CHUNKS = ReadModifyWriteStateSpec("chunks", VarIntCoder())

    def __init__(self, layout: Layout):
        self.layout = layout

    def setup(self):
        use_emulator_credentials()

    def process(self, group_ids, entries=beam.DoFn.StateParam(ENTRIES), chunks=beam.DoFn.StateParam(CHUNKS)):
        (hour_start, shard, group), (planned_chunks, buckets, num_shards, chunk_entries) = group_ids
        if chunk_entries is PUBLISHED or any(chunk_entries):
            entries.add(chunk_entries)
        received = (chunks.read() or 0) + 1
        if received < planned_chunks:
            chunks.write(received)
            return
        parts = list(entries.read())
        members = groups(buckets)[group]
        if PUBLISHED not in parts:
            folder = self.layout.hour(self.layout.id_index, hour_start)
            for place, bucket in enumerate(members):
                write_bucket(folder, shard, bucket, buckets, num_shards, [part[place] for part in parts])
            copies = [entry for part in parts for listed in part for entry in listed if not isinstance(entry, str)]
            staging = self.layout.hour(self.layout.staging, hour_start)
            save_later_copies(staging, shard, group, later_copies(copies))
        entries.clear()
        chunks.clear()
        yield hour_start, len(members)

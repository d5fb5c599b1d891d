"""The close's index of an hour's ids, as steps: each read task's ids shuffled to (hour, shard, bucket)
keys, and each bucket written once every chunk of its shard was read (``transforms.id_index``).

No task holds more than a chunk of a shard's files (``IDS_PER_CHUNK`` records), no key more than a bucket
(~``IDS_PER_BUCKET`` ids), and no element more than a chunk's ids in one bucket, whatever the hour holds.
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
from transforms.id_index import ids_by_bucket, sources_by_shard, write_bucket

BUCKET_KEY = tuple[tuple[int, int, int], typing.Any]  # (hour start, shard, bucket): a deterministic key coder


def read_index_chunk(layout: Layout, hour_start: int, task: dict, sources: dict[int, list[str]] | None) -> list:
    """The ids of one read task's chunk, by bucket: ``((hour start, shard, bucket), (chunks, buckets,
    num_shards, entries))`` for every bucket of its shard (``id_index.ids_by_bucket``); none once the
    hour's marker says it is published (every bucket was written). ``sources`` are the staged files of the
    hour's saved plan by shard (``sources_by_shard``): the task names its files by their places there."""
    if sources is None or files.exists(layout.marker(hour_start)):
        return []
    folder = layout.hour(layout.id_index, hour_start)
    return [
        ((hour_start, shard, bucket), ids)
        for (shard, bucket), ids in ids_by_bucket(folder, task, sources[task["index_of_shard"]])
    ]


class ReadIndexChunkFn(beam.DoFn):
    """``(hour start, read task)`` in; the chunk's ids by bucket out (``read_index_chunk``). ``planned_sources``
    reads the staged files of an hour's saved plan."""

    def __init__(self, layout: Layout, planned_sources: Callable[[Layout, int], list[str]]):
        self.layout = layout
        self.planned_sources = planned_sources

    def setup(self):
        use_emulator_credentials()
        self._sources = (None, {})  # the last hour's planned staged files, by shard

    def process(self, hour_task):
        hour_start, task = hour_task
        yield from read_index_chunk(self.layout, hour_start, task, self._planned_sources(hour_start, task))

    def _planned_sources(self, hour_start: int, task: dict) -> dict[int, list[str]] | None:
        """A saved plan is never changed, so a worker reads it once for all the read tasks it gets of the
        hour (~150 B a staged file: tens of MB for a busy type), not once per task."""
        hour = (hour_start, task["num_shards"])
        if self._sources[0] != hour:
            if files.exists(self.layout.marker(hour_start)):
                return None  # published, its plan perhaps gone: nothing to read
            planned = self.planned_sources(self.layout, hour_start)
            self._sources = (hour, sources_by_shard(planned, task["num_shards"]))
        return self._sources[1]


class WriteIndexBucketFn(beam.DoFn):
    """``((hour start, shard, bucket), (chunks, buckets, num_shards, entries))`` in, one from each read task
    of the shard; once all ``chunks`` have sent theirs, the bucket is written, and its hour start goes out:
    once per bucket. A key holds one bucket's entries until then, and none after.

    Each read task's output is committed once (Dataflow runs a work item again only if its commit was
    lost), so the count of chunks is exact; a try of the last one whose commit was lost writes the same
    file again, from the same state."""

    ENTRIES = BagStateSpec("entries", FastPrimitivesCoder())
    CHUNKS = ReadModifyWriteStateSpec("chunks", VarIntCoder())

    def __init__(self, layout: Layout):
        self.layout = layout

    def setup(self):
        use_emulator_credentials()

    def process(self, bucket_ids, entries=beam.DoFn.StateParam(ENTRIES), chunks=beam.DoFn.StateParam(CHUNKS)):
        (hour_start, shard, bucket), (planned_chunks, buckets, num_shards, chunk_entries) = bucket_ids
        if chunk_entries:
            entries.add(chunk_entries)
        received = (chunks.read() or 0) + 1
        if received < planned_chunks:
            chunks.write(received)
            return
        folder = self.layout.hour(self.layout.id_index, hour_start)
        write_bucket(folder, shard, bucket, buckets, num_shards, entries.read())
        entries.clear()
        chunks.clear()
        yield hour_start

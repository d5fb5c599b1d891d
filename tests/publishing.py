"""The close's publishing, one step after the other, as ``PublishHours`` runs it: for tests that need a
published hour, and for those that play Dataflow's retries step by step."""

from __future__ import annotations

from event_delivery.contract.partitions import Layout
from transforms import index_buckets, publish


class Cell:
    """A state cell, bag or timer of a key, in the copy of the key's state a work item sees."""

    def __init__(self, values: dict, name: str, empty=None):
        self.values, self.name, self.empty = values, name, empty

    def read(self):
        return self.values.get(self.name, self.empty)

    def write(self, value):
        self.values[self.name] = value

    set = write

    def add(self, value):
        self.values[self.name] = [*self.read(), value]

    def clear(self):
        self.values.pop(self.name, None)


class BucketWriter:
    """``WriteIndexBucketFn`` with a state per (hour, shard, group) key; ``process`` returns ``(hour, buckets
    written)`` once it wrote a group."""

    def __init__(self, layout: Layout):
        self.fn = index_buckets.WriteIndexBucketFn(layout)
        self.fn.setup()
        self.state: dict[tuple, dict] = {}

    def process(self, group_ids) -> list:
        values = self.state.setdefault(group_ids[0], {})
        return list(self.fn.process(group_ids, entries=Cell(values, "entries", []), chunks=Cell(values, "chunks")))


def index_reader(layout: Layout) -> index_buckets.ReadIndexChunkFn:
    reader = index_buckets.ReadIndexChunkFn(layout, publish.planned_sources)
    reader.setup()
    return reader


def publish_planned(layout: Layout, hour_start: int, plan: dict) -> dict:
    """Writes a planned hour's index, each read task once, in plan order, then its parts, as ``PublishHours``
    sends them once the last bucket is written, then the marker; returns the manifest."""
    reader, buckets = index_reader(layout), BucketWriter(layout)
    indexed = 0
    for task in publish.index_to_read(plan):
        for group_ids in reader.process((hour_start, task)):
            indexed += sum(count for _, count in buckets.process(group_ids))
    assert indexed == publish.buckets_planned(plan), "every bucket written before the parts"
    for part in publish.parts_to_write(plan):
        publish.write_part(layout, hour_start, part)
    return publish.finish_hour(layout, hour_start)

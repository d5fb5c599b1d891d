"""The index of a closed hour's ids, which the close leaves beside the hour for its late repeats.

Written by the close before its marker (``index_tasks`` in the plan, ``write_index`` on any worker),
read by late panes (``indexed_ids``, ``transforms.late``). Per shard, split by a second hash into
buckets of at most ``IDS_PER_BUCKET`` ids: a late pane reads only the buckets its own ids fall in,
never the hour, and no more than its ``ReadBudget``.
"""

from __future__ import annotations

import math
import zlib

import apache_beam as beam

from event_delivery.cloud import files
from event_delivery.contract import partitions, slo
from event_delivery.contract.partitions import Layout
from transforms.hours import shard_of

IDS_PER_BUCKET = 10_000  # ~400 KB of JSON at ~40 B an id: what a late pane reads per bucket its ids hit
# What one late pane may read of the index and of its shard's late files; past it, the rest of the pane
# is written unchecked (counted), so that a late burst, whose panes ``CloseHour`` hears of, never holds the
# watermark with reads that grow with the hour. A read counts as at least ``MIN_READ_BYTES`` (its round
# trip), which bounds the number of reads too: 64.
READ_BUDGET_BYTES = 16 * 1024 * 1024
MIN_READ_BYTES = 256 * 1024
# The most ids of a shard-hour that one index task holds in memory (~100 B each in Python: ~200 MB). A
# shard with more is skipped, decided from the plan's counts, so that every retry agrees: on Dataflow a
# task that runs out of memory is retried for good, and the hour's marker waits for it.
MAX_INDEXED_IDS = 2_000_000


def index_bucket(event_id: str, num_shards: int, buckets: int) -> int:
    """The bucket of an id within its shard (``shard_of`` takes the same hash modulo the shards)."""
    return zlib.crc32(event_id.encode("utf-8")) // num_shards % buckets


def index_tasks(staged: dict[str, int], num_shards: int) -> list[dict]:
    """One task per shard, ``{"index_of_shard", "buckets", "num_shards"}``, to write the ids of the hour's
    staged files (path -> records) of that shard. A task names no files: the close emits its parts and
    these in one commit, so the shard's files are read from the saved plan (``write_index``). Every
    shard gets one, also with no files (an empty bucket), so that a missing index means one that could
    not be written, not an empty shard; one of more than ``MAX_INDEXED_IDS`` has 0 buckets: skipped."""
    records = dict.fromkeys(range(num_shards), 0)
    for path, count in staged.items():
        records[_reader_of(path, num_shards)] += count
    return [
        {"index_of_shard": shard, "buckets": _buckets(count), "num_shards": num_shards}
        for shard, count in records.items()
    ]


def _reader_of(path: str, num_shards: int) -> int:
    """The index task that reads a staged file: the shard in its name, modulo the shard count. A run of
    another shard count (drained, then deployed with a new layout) may have staged it for the hour, so
    the name may hold any shard, or none: ``write_index`` checks every id it reads against its shard."""
    try:
        return partitions.shard_of_file(path) % num_shards
    except (AttributeError, ValueError):  # no shard in the name
        return 0


def _buckets(records: int) -> int:
    return 0 if records > MAX_INDEXED_IDS else max(1, math.ceil(records / IDS_PER_BUCKET))


def is_index_task(task: dict) -> bool:
    return "index_of_shard" in task


def write_index(folder: str, task: dict, staged: list[str]) -> None:
    """The buckets of one shard's ids in the hour's ``staged`` files (those of the plan), each a sorted JSON
    list in ``folder``, under fixed names: a retry rewrites them.

    It holds the shard's ids of the hour in memory, at most ``MAX_INDEXED_IDS``: a task of a shard with
    more (0 buckets) writes a sentinel instead, and its late panes are written unchecked, counted.

    An id of another shard in its files was staged by a run of another shard count: the index of every
    shard may then miss ids that files of other shards hold, so the task writes the sentinel of every
    shard of the hour (beside whatever buckets other tasks write: ``indexed_ids`` takes the sentinel)."""
    shard, buckets, num_shards = task["index_of_shard"], task["buckets"], task["num_shards"]
    if not buckets:
        _skip(folder, [shard], num_shards, "index_shards_skipped")
        return
    split: list[set[str]] = [set() for _ in range(buckets)]
    for source in staged:
        if _reader_of(source, num_shards) != shard:
            continue
        for event_id in files.read_event_ids(source):
            if event_id and shard_of(event_id, num_shards) != shard:  # no id: sharded by its receipt time
                _skip(folder, range(num_shards), num_shards, "index_hours_of_another_shard_count")
                return
            split[index_bucket(event_id, num_shards, buckets)].add(event_id)
    for bucket, ids in enumerate(split):
        path = partitions.join(folder, partitions.id_index_name(shard, bucket, buckets, num_shards))
        files.write_json(path, sorted(ids))


def _skip(folder: str, shards, num_shards: int, counter: str) -> None:
    for shard in shards:
        files.write_json(partitions.join(folder, partitions.id_index_skipped_name(shard, num_shards)), {})
    beam.metrics.Metrics.counter(slo.NAMESPACE, counter).inc()  # per try: see docs/dataflow.md


class ReadBudget:
    """What a late pane may still read, in bytes (``READ_BUDGET_BYTES``); ``spent`` once a read was refused."""

    def __init__(self):
        self.limit = READ_BUDGET_BYTES
        self.left, self.spent = self.limit, False

    def allows(self, size: int) -> bool:
        cost = max(size, MIN_READ_BYTES)
        self.spent = self.spent or cost > self.left
        self.left -= 0 if self.spent else cost
        return not self.spent


def indexed_ids(
    layout: Layout, hour_start: int, shard: int, event_ids: set[str], num_shards: int, budget: ReadBudget
) -> set[str]:
    """Those of ``event_ids`` (all of ``shard``) that the closed hour's index holds, as far as ``budget``
    reads. Raises ``LookupError`` when there is no complete index to ask: the hour has no marker yet, none
    was left, it was split into another number of shards than ``num_shards`` (another deployment's), or
    the shard was skipped (a sentinel among its files, also beside buckets)."""
    if not files.exists(layout.marker(hour_start)):
        raise LookupError("the hour has no marker yet")
    folder = layout.hour(layout.id_index, hour_start)
    written = files.sizes(partitions.join(folder, partitions.id_index_pattern(shard)))
    if not written:
        raise LookupError("the hour has no index of its ids")
    shapes = [partitions.id_index_shape(path) for path in written]
    if any(shape is None or shape[0] != num_shards for shape in shapes):
        raise LookupError(f"the hour's index was split into other shards than {num_shards}")
    buckets = min(shape[1] for shape in shapes)
    if not buckets:
        raise LookupError(
            "the shard's index was skipped: more ids than its index may hold, or staged files of another shard count"
        )
    found = set()
    for bucket in sorted({index_bucket(i, num_shards, buckets) for i in event_ids}):
        path = partitions.join(folder, partitions.id_index_name(shard, bucket, buckets, num_shards))
        if not budget.allows(written.get(path, 0)):
            break
        found |= event_ids.intersection(files.read_json(path))
    return found

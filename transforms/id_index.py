"""The index of a closed hour's ids, which the close leaves beside the hour for its late repeats.

Written by the close before its marker, read by late panes (``indexed_ids``, ``transforms.late``). Per
shard, split by a second hash into buckets of at most ``IDS_PER_BUCKET`` ids: a late pane reads only the
buckets its own ids fall in, never the hour, and no more than its ``ReadBudget``.

The close shuffles the ids to their buckets, so that no task holds more than a chunk or a group of
buckets, whatever the hour holds. The plan names *read tasks* (``index_tasks``): per shard, its staged
files in chunks of at most ``IDS_PER_CHUNK`` records, each task naming its shard's bucket and chunk counts,
and its files in a list of its own saved beside the plan (``save_task_sources``), so that a task reads
~150 B a file of its chunk, not the plan. A read task (``ids_by_group``) sends, for every group of ``BUCKETS_PER_GROUP``
buckets of its shard, also an empty one, the chunk's ids that fall in each of them; a group, keyed by
(hour, shard, group), writes its buckets (``write_bucket``) once every chunk of its shard has sent its
part. The marker waits for every bucket, so a marker means a complete index. Each id goes with its file's
place in the plan, so that a group's key, which sees every copy of its ids, also lists the hour's repeats
for the parts to leave out (``transforms.close_repeats``).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import math
import zlib

import apache_beam as beam

from event_delivery.cloud import files
from event_delivery.contract import partitions, slo
from event_delivery.contract.partitions import Layout
from transforms.hours import shard_of

IDS_PER_BUCKET = 10_000  # ~400 KB of JSON at ~40 B an id: what a late pane reads per bucket its ids hit
# The most records of a read task's chunk: what it holds (strings, and a tuple of (entry, part, place) per
# id, measured in tests/unit/test_index_buckets.py: every harness thread of a worker may run one), and what
# it sends on in one commit (each id at most ``MAX_ENTRY_BYTES`` and its place: ≤ ~20 MB, ~12 MB for
# 36-character ids), well below Streaming Engine's ~80 MB.
IDS_PER_CHUNK = 250_000
# The buckets of a shard that one key of ``WriteIndexBuckets`` writes: a chunk sends one element per group,
# not per bucket, and a key holds at most ~160,000 ids (~6.5 MB) until its chunks have all come.
BUCKETS_PER_GROUP = 16
# Each read task's staged files, beside the plan in the hour's staging folder (``sources_name``).
SOURCES_PREFIX = "_CLOSING-index-"
SAVING_THREADS = 32  # the read tasks' lists the close writes at a time
# An id longer than this (UTF-8) is indexed by its digest, so that an entry, and with it a chunk's commit, is
# bounded whatever ids producers send (an attribute may hold 1 KB).
MAX_ENTRY_BYTES = 64
DIGEST = "sha256:"
# What one late pane may read of the index and of its shard's late files; past it, the rest of the pane
# is written unchecked (counted), so that a late burst, whose panes ``CloseHour`` hears of, never holds the
# watermark with reads that grow with the hour. A read counts as at least ``MIN_READ_BYTES`` (its round
# trip), which bounds the number of reads too: 64.
READ_BUDGET_BYTES = 16 * 1024 * 1024
MIN_READ_BYTES = 256 * 1024


def index_bucket(event_id: str, num_shards: int, buckets: int) -> int:
    """The bucket of an id within its shard (``shard_of`` takes the same hash modulo the shards)."""
    return zlib.crc32(event_id.encode("utf-8")) // num_shards % buckets


def index_entry(event_id: str) -> str:
    """How an id is held in its bucket: as it is, or by its digest if it is longer than ``MAX_ENTRY_BYTES``."""
    encoded = event_id.encode("utf-8")
    return event_id if len(encoded) <= MAX_ENTRY_BYTES else DIGEST + hashlib.sha256(encoded).hexdigest()


def index_tasks(staged: dict[str, int], num_shards: int) -> list[dict]:
    """The read tasks that index the hour's staged files (path -> records): per shard, its files in name
    order cut into chunks of at most ``IDS_PER_CHUNK`` records (a bigger file is a chunk of its own), each
    ``{"index_of_shard", "num_shards", "buckets", "chunks", "chunk", "files": [start, stop]}``. A task names its
    files by their places among its shard's files in the saved plan (``sources_by_shard``) and by its list
    (``sources_name``), not by path: the close emits its parts and these in one commit. Every shard gets a
    bucket and a chunk, also with no files (an empty bucket), so that a missing index means one that could
    not be written, not an empty shard."""
    tasks = []
    for shard, paths in sources_by_shard(list(staged), num_shards).items():
        cuts, records = [0], 0
        for place, path in enumerate(paths):
            if records and records + staged[path] > IDS_PER_CHUNK:
                cuts.append(place)
                records = 0
            records += staged[path]
        cuts.append(len(paths))
        buckets = max(1, math.ceil(sum(staged[p] for p in paths) / IDS_PER_BUCKET))
        shape = {"index_of_shard": shard, "num_shards": num_shards, "buckets": buckets, "chunks": len(cuts) - 1}
        chunks = enumerate(itertools.pairwise(cuts))
        tasks += [shape | {"chunk": chunk, "files": [start, stop]} for chunk, (start, stop) in chunks]
    return tasks


def sources_name(task: dict) -> str:
    return f"{SOURCES_PREFIX}s{task['index_of_shard']:03d}-c{task['chunk']:05d}.json"


def save_task_sources(staging: str, tasks: list[dict], places: dict[str, list[int]]) -> None:
    """Each read task's staged files (of ``places``, the plan's, ``close_repeats.plan_places``), in a list of
    its own in the hour's ``staging`` folder, each file with its place in the plan: ``[path, part, place]``;
    none for a task with no files. Saved before the plan, which stays the commit point: a close that
    crashes before it saves its plan saves the lists again, under the same names, and
    ``remove_task_sources`` deletes whatever an earlier try left."""
    by_shard = sources_by_shard(list(places), tasks[0]["num_shards"]) if tasks else {}
    lists = {
        partitions.join(staging, sources_name(task)): [
            [path, *places[path]] for path in by_shard[task["index_of_shard"]][slice(*task["files"])]
        ]
        for task in tasks
        if task["files"][0] < task["files"][1]
    }
    # ~14,400 lists an hour at 1M events/s: one after another they would hold the close's work item for
    # minutes (~40 ms a write), so they are written side by side.
    with concurrent.futures.ThreadPoolExecutor(SAVING_THREADS) as pool:
        list(pool.map(files.write_json, lists, lists.values()))


def task_sources(staging: str, task: dict, planned_sources) -> list[tuple[str, list[int] | None]]:
    """The staged files of a read task's chunk, each with its place in the plan (``[part, place]``): its list
    (``save_task_sources``), kilobytes. A list saved before lists held places (a path alone), and a task of a
    plan saved before tasks had lists, which reads its places among its shard's files in the whole plan
    (``planned_sources()``), give no places: their ids are indexed, and no repeat among them is dropped."""
    start, stop = task["files"] or (0, None)
    if "chunk" in task:
        listed = [] if start == stop else files.read_json(partitions.join(staging, sources_name(task)))
        return [(source, None) if isinstance(source, str) else (source[0], source[1:]) for source in listed]
    by_shard = sources_by_shard(planned_sources(), task["num_shards"])
    return [(source, None) for source in by_shard[task["index_of_shard"]][start:stop]]


def remove_task_sources(staging: str) -> None:
    """Deletes every read task's list in the hour's ``staging`` folder, also one a crashed try left."""
    files.delete_existing(files.glob(partitions.join(staging, SOURCES_PREFIX + "*.json")))


def _reader_of(path: str, num_shards: int) -> int:
    """The shard whose read tasks read a staged file: the shard in its name, modulo the shard count. A run
    of another shard count (drained, then deployed with a new layout) may have staged it for the hour, so
    the name may hold any shard, or none: ``ids_by_group`` checks every id it reads against its shard."""
    try:
        return partitions.shard_of_file(path) % num_shards
    except (AttributeError, ValueError):  # no shard in the name
        return 0


def is_index_task(task: dict) -> bool:
    return "index_of_shard" in task


def as_chunks(index: list[dict]) -> list[dict]:
    """A plan's read tasks, also those of a plan saved before the ids were shuffled to their buckets."""
    return [task if "chunks" in task else _as_chunk(task) for task in index]


def _as_chunk(task: dict) -> dict:
    """An earlier plan's task reads all its shard's files (``files`` None) as one chunk; one of 0 buckets (its
    shard skipped for its size) writes the shard's sentinel, and sends one empty bucket."""
    return task | {"chunks": 1, "files": None, "buckets": task["buckets"] or 1, "skipped": not task["buckets"]}


def sources_by_shard(sources: list[str], num_shards: int) -> dict[int, list[str]]:
    """A plan's staged files by the shard whose read tasks read them, in name order: where ``files`` point."""
    by_shard: dict[int, list[str]] = {shard: [] for shard in range(num_shards)}
    for path in sorted(sources):
        by_shard[_reader_of(path, num_shards)].append(path)
    return by_shard


def groups(buckets: int) -> list[range]:
    """A shard's buckets, in groups of ``BUCKETS_PER_GROUP``: one key of ``WriteIndexBuckets`` each."""
    return [range(first, min(first + BUCKETS_PER_GROUP, buckets)) for first in range(0, buckets, BUCKETS_PER_GROUP)]


def ids_by_group(folder: str, task: dict, sources: list[tuple[str, list[int] | None]]):
    """For every group of buckets of the task's shard (``groups``), ``((shard, group), (chunks, buckets,
    num_shards, entries))``: per bucket of the group, the entries (``index_entry``) of those ids of its
    chunk's files (``sources``, ``(path, place in the plan)``) that fall in the bucket, in the files' order,
    each as ``(entry, part, place)`` when its file has a place (``close_repeats``); empty lists too, since a
    group's writer counts the chunks it has heard from. Lists, not sets: every copy of a repeated id is
    sent, so that the group's writer can keep the first.

    An id of another shard in its files was staged by a run of another shard count: the index of every
    shard may then miss ids that files of other shards hold, so the task writes the sentinel of every
    shard of the hour once (beside whatever buckets are written: ``indexed_ids`` takes the sentinel), and
    sends the ids of its own shard alone, so that the repeats among them are still found."""
    shard, buckets, num_shards = task["index_of_shard"], task["buckets"], task["num_shards"]
    split: list[list[str]] = [[] for _ in range(buckets)]
    if task.get("skipped"):
        _skip(folder, [shard], num_shards, "index_shards_skipped")
        sources = []
    skipped = False
    for source, place in sources:
        event_ids = files.read_event_ids(source)
        if any(i and shard_of(i, num_shards) != shard for i in event_ids):  # no id: sharded by its receipt time
            if not skipped:
                _skip(folder, range(num_shards), num_shards, "index_hours_of_another_shard_count")
            skipped = True
            event_ids = [i for i in event_ids if i and shard_of(i, num_shards) == shard]
        for event_id in event_ids:
            entry = index_entry(event_id) if place is None else (index_entry(event_id), *place)
            split[index_bucket(event_id, num_shards, buckets)].append(entry)
    for group, members in enumerate(groups(buckets)):
        yield (shard, group), (task["chunks"], buckets, num_shards, [split[bucket] for bucket in members])


def write_bucket(folder: str, shard: int, bucket: int, buckets: int, num_shards: int, parts) -> None:
    """One bucket of a shard's ids, from the entry lists its chunks sent (an entry alone, or a copy with its
    place): a sorted JSON list in ``folder``, under a fixed name, so that a retry rewrites it."""
    entries = sorted({entry if isinstance(entry, str) else entry[0] for part in parts for entry in part})
    files.write_json(partitions.join(folder, partitions.id_index_name(shard, bucket, buckets, num_shards)), entries)


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
            "the shard's index was skipped: staged files of another shard count, or too many ids for an earlier close"
        )
    found = set()
    for bucket in sorted({index_bucket(i, num_shards, buckets) for i in event_ids}):
        path = partitions.join(folder, partitions.id_index_name(shard, bucket, buckets, num_shards))
        if not budget.allows(written.get(path, 0)):
            break
        held = set(files.read_json(path))
        found |= {i for i in event_ids if i in held or index_entry(i) in held}  # an id as it is: an older index
    return found

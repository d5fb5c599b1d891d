"""Late panes: written to the late root, less the ids that their hour already holds, for the whole late horizon.

``MarkRepeats`` forgets an id one window after its hour closed: state per id for the
whole late horizon (7 days) is not affordable at 1M events/s. So the close leaves the
hour's ids behind, in an *index* beside the hour (``Layout.id_index``), written before
the marker; late panes, which are rare, read it. The index of an hour is split by the
pane key's shard, and within a shard into buckets of at most ``IDS_PER_BUCKET`` ids by a
second hash: a late pane reads only the buckets its own ids fall in, never the hour.

``WriteLatePanes`` keys late panes by (hour, shard) alone, so one key's work, a pane at a
time, reads the index and the late files that earlier panes of its shard wrote, and
drops the ids found there as duplicates (an hour report, so the hour's accounting stays
``in = delivered + duplicates + late + dead-lettered``). A retried work item rewrites the
files it wrote before under the same numbers, perhaps for panes in another order: files of
this key numbered at or past the number state kept are no earlier copies, and a pane that
keeps nothing deletes the file a lost try may have written under its number. A pane that
cannot read what it should (no marker yet: the close is still publishing; an index missing
or unreadable) is written as it is and counted (``late_panes_unchecked``): the index is a
way to drop repeats, never a reason to stall.
"""

from __future__ import annotations

import logging
import math
import posixpath
import re
import zlib

import apache_beam as beam

from event_delivery.cloud import files
from event_delivery.contract import partitions, slo
from event_delivery.contract.partitions import Layout
from transforms import write
from transforms.hours import bucket_start_seconds
from transforms.reports import DUPLICATES, LATE, report
from transforms.write import WRITE_FAILED, WriteNumberedPaneFn

_LOG = logging.getLogger(__name__)
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
        records[partitions.shard_of_file(path)] += count
    return [
        {"index_of_shard": shard, "buckets": _buckets(count), "num_shards": num_shards}
        for shard, count in records.items()
    ]


def _buckets(records: int) -> int:
    return 0 if records > MAX_INDEXED_IDS else max(1, math.ceil(records / IDS_PER_BUCKET))


def is_index_task(task: dict) -> bool:
    return "index_of_shard" in task


def write_index(folder: str, task: dict, staged: list[str]) -> None:
    """The buckets of one shard's ids in the hour's ``staged`` files (those of the plan), each a sorted JSON
    list in ``folder``, under fixed names: a retry rewrites them.

    It holds the shard's ids of the hour in memory, at most ``MAX_INDEXED_IDS``: a task of a shard with
    more (0 buckets) writes a sentinel instead, and its late panes are written unchecked, counted."""
    shard, buckets, num_shards = task["index_of_shard"], task["buckets"], task["num_shards"]
    if not buckets:
        files.write_json(partitions.join(folder, partitions.id_index_skipped_name(shard, num_shards)), {})
        beam.metrics.Metrics.counter(slo.NAMESPACE, "index_shards_skipped").inc()  # per try: see docs/dataflow.md
        return
    split: list[set[str]] = [set() for _ in range(buckets)]
    for source in staged:
        if partitions.shard_of_file(source) == shard:
            for event_id in files.read_event_ids(source):
                split[index_bucket(event_id, num_shards, buckets)].add(event_id)
    for bucket, ids in enumerate(split):
        path = partitions.join(folder, partitions.id_index_name(shard, bucket, buckets, num_shards))
        files.write_json(path, sorted(ids))


class ReadBudget:
    """What a late pane may still read, in bytes (``READ_BUDGET_BYTES``); ``spent`` once a read was refused."""

    def __init__(self):
        self.left, self.spent = READ_BUDGET_BYTES, False

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
    was left, or it was split into another number of shards than ``num_shards`` (another deployment's)."""
    if not files.exists(layout.marker(hour_start)):
        raise LookupError("the hour has no marker yet")
    folder = layout.hour(layout.id_index, hour_start)
    written = files.sizes(partitions.join(folder, partitions.id_index_pattern(shard)))
    if not written:
        raise LookupError("the hour has no index of its ids")
    shape = partitions.id_index_shape(min(written))
    if shape is None or shape[0] != num_shards:
        raise LookupError(f"the hour's index was split into other shards than {num_shards}")
    buckets = shape[1]
    if not buckets:
        raise LookupError("the shard held more ids than its index may")
    found = set()
    for bucket in sorted({index_bucket(i, num_shards, buckets) for i in event_ids}):
        path = partitions.join(folder, partitions.id_index_name(shard, bucket, buckets, num_shards))
        if not budget.allows(written.get(path, 0)):
            break
        found |= event_ids.intersection(files.read_json(path))
    return found


NUMBER = WriteNumberedPaneFn.NUMBER


class WriteLatePaneFn(WriteNumberedPaneFn):
    """Writes a late pane of an (hour, shard) less the ids its hour already holds: delivered (in the
    index), or written late by an earlier pane of the shard. Those are counted as duplicates."""

    def __init__(self, settings):
        schema, to_record = settings.event_type.delivered_schema, write.event_record  # looked up when built, as
        # ``WriteAvroPanes`` does
        super().__init__(settings, settings.layout.late, LATE, schema, to_record, True, None, partitions.LATE_SERIES)
        self.num_shards = settings.num_shards

    def setup(self):
        super().setup()
        self.duplicates = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.DUPLICATES)
        self.unchecked = beam.metrics.Metrics.counter(slo.NAMESPACE, "late_panes_unchecked")

    def process(
        self, pane_elements, window=beam.DoFn.WindowParam, number=beam.DoFn.StateParam(WriteNumberedPaneFn.NUMBER)
    ):
        (shard, writer), events = pane_elements
        if not events:
            return
        current = number.read() or 0  # the file this pane writes: on a retry, the one it wrote before
        held = self._held_by_the_hour(window, shard, {e[0] for e in events}, current)
        kept = [e for e in events if e[0] not in held]
        if len(kept) < len(events):
            self.duplicates.inc(len(events) - len(kept))
            yield report(DUPLICATES, len(events) - len(kept))
        if kept:
            number.write(current + 1)
            yield from self.write(((shard, writer), kept), window, current)
        else:  # an earlier try of this pane may have written it unchecked: its commit was lost, so is its file
            self._delete_uncommitted(partitions.join(self._folder(window), self._name(shard, writer, current)))

    def _uncommitted(self, path: str, current: int) -> bool:
        """Whether ``path`` is one of this key's files from a try whose commit was lost: numbered at or past
        the number state kept. It is no earlier copy: the retry may take its panes in another order, and
        rewrites those names."""
        prefix = re.escape(f"{self.layout.event_type}-{self.run_id}-{partitions.LATE_SERIES}")
        written = re.match(rf"{prefix}(\d+)-s", posixpath.basename(path))
        return bool(written) and int(written.group(1)) >= current

    def _held_by_the_hour(self, window, shard: int, event_ids: set[str], current: int) -> set[str]:
        hour_start, budget = bucket_start_seconds(window), ReadBudget()
        held = set()
        try:
            held |= indexed_ids(self.layout, hour_start, shard, event_ids, self.num_shards, budget)
        except Exception as error:  # noqa: BLE001 - an index is never a reason to fail a bundle for good
            self._count_unchecked("its hour's index", error)
        try:
            late_files = partitions.late_files_of_shard(self._folder(window), self.layout.event_type, shard)
            for path, size in sorted(late_files.items()):
                if not self._uncommitted(path, current) and budget.allows(size):
                    held |= event_ids.intersection(files.read_event_ids(path))
        except Exception as error:  # noqa: BLE001 - as above
            self._count_unchecked("the late files of its shard", error)
        if budget.spent:
            self._count_unchecked("all it should", LookupError(f"past its {READ_BUDGET_BYTES} bytes to read"))
        return held

    def _delete_uncommitted(self, path: str) -> None:
        try:
            files.delete_existing([path])
        except Exception as error:  # noqa: BLE001 - a stray late copy is no reason to fail a bundle for good
            _LOG.warning("a late file of a lost commit, %s, could not be deleted (%s)", path, type(error).__name__)

    def _count_unchecked(self, what: str, error: Exception) -> None:
        self.unchecked.inc()
        reason = str(error) if isinstance(error, LookupError) else type(error).__name__
        _LOG.warning("a late pane of %s was not checked against %s (%s)", self.layout.event_type, what, reason)


def _keyed_by_shard(pane):
    """A late pane keyed by its shard alone: one key's work at a time sees the late files of the others."""
    (shard, _), events = pane
    return (shard, ""), events


class WriteLatePanes(beam.PTransform):
    """``((shard, writer), [events])`` late panes in; ``reports`` (late files, duplicates) and
    ``write_failed`` out, as ``WriteAvroPanes`` with ``give_up_failures``."""

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def expand(self, panes):
        return (
            panes
            | "KeyByShard" >> beam.Map(_keyed_by_shard)
            | "WriteFiles" >> beam.ParDo(WriteLatePaneFn(self.settings)).with_outputs(WRITE_FAILED, main="reports")
        )

"""Publish a closed hour: compact its staged pane files into parts, then write ``_SUCCESS``.

``CloseHour`` decides that an hour is closed and saves its *plan* in the hour's staging
folder (``_CLOSING.json``) before anything moves: which staged files make which part,
and the manifest. Then the parts are written side by side, on any worker: a part is
its pane files' Avro blocks in one file of about ``--target_file_mb``, compressed. Panes
are staged uncompressed, so each record is compressed once, here, and none is decoded.
The plan names each part's codec (``--codec`` when it was saved): a part is written with
one codec, and so is every part of an hour, also when an update changes the codec meanwhile.
When every part is written, the marker is written, and only then are the staged files
deleted.

Every step can run again: a part is rewritten from staged files that are all still
there until the marker exists, a part whose hour has its marker is not written again,
and finishing an hour whose plan is gone reads its manifest from the marker. A close
retried after a crash therefore publishes the same parts and the same manifest, however
far the first attempt got.

A saved plan is never changed, since any of its parts may be written already. It holds
what it was made from; whatever a later attempt (or a later run) finds for the
hour that the plan does not list (``unplanned``) arrived after the close: ``CloseHour``
moves such files to the late root and counts them there, as it does after the marker.
"""

from __future__ import annotations

import collections
import logging
import posixpath
import time
import typing

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
from apache_beam.transforms.window import GlobalWindows

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions, slo
from event_delivery.contract.partitions import Layout
from transforms.declared_types import ANY_OUTPUT
from transforms.id_index import as_chunks, index_tasks, is_index_task, remove_task_sources, save_task_sources
from transforms.index_buckets import GROUP_KEY, ReadIndexChunkFn, WriteIndexBucketFn
from transforms.reports import DEAD_LETTERED, DELIVERED, DUPLICATES, FORGOTTEN, SUPERSEDED

_LOG = logging.getLogger(__name__)
CLOSE_PLAN = "_CLOSING.json"  # in the hour's staging folder while it closes
PLANNED, WRITTEN = "planned", "written"
COUNTED_WITHOUT_A_FILE = (DUPLICATES, FORGOTTEN)  # the reports a manifest counts that name no file
wall_clock = time.time  # module-level, so that a test can set the clock of the close delay


def build_manifest(
    event_type_name, hour_start, window_seconds, closes_at, delivered_files, reports, replayed: bool = False
) -> dict:
    """The ``_SUCCESS`` document: the hour's files and its accounting at close.

    ``delivered_files`` maps each published file to its record count; ``reports``
    supply the duplicates and dead letters counted while the hour was open, and how
    many delivered events belonged to forgotten subjects (a part of ``delivered``).
    ``replayed`` marks an hour closed by a bounded job (a backfill), long after the fact:
    its close time says nothing about timeliness.
    """
    duplicates = sum(records for kind, records, _ in reports if kind in (DUPLICATES, SUPERSEDED))
    forgotten = sum(records for kind, records, _ in reports if kind == FORGOTTEN)
    dead_letter_files = {path: records for kind, records, path in reports if kind == DEAD_LETTERED}
    delivered = sum(delivered_files.values())
    dead_lettered = sum(dead_letter_files.values())
    return {
        "event_type": event_type_name,
        "hour_start": partitions.iso_utc(hour_start),
        "hour_end": partitions.iso_utc(hour_start + window_seconds),
        "closed_at_watermark": partitions.iso_utc(closes_at),
        "replayed": replayed,
        "files": [{"path": path, "records": n} for path, n in sorted(delivered_files.items())],
        "dead_letter_files": [{"path": path, "records": n} for path, n in sorted(dead_letter_files.items())],
        "accounting": {
            "in": delivered + duplicates + dead_lettered,
            "delivered": delivered,
            "duplicates": duplicates,
            "dead_lettered": dead_lettered,
            "forgotten": forgotten,
        },
    }


def group_into_parts(staged: dict[str, tuple[int, int]], target_bytes: int) -> list[list[str]]:
    """Staged files (path -> (records, bytes, uncompressed)) grouped into parts of about ``target_bytes``, in
    name order; files of different runs never share a part (a run writes one schema), and
    ``target_bytes`` 0 makes every file a part of its own."""
    parts, size, run = [], 0, None
    for path in sorted(staged):
        file_run = posixpath.basename(path).rsplit("-p", 1)[0]
        bytes_ = staged[path][1]
        if not parts or file_run != run or not target_bytes or size + bytes_ > target_bytes:
            parts.append([])
            size, run = 0, file_run
        parts[-1].append(path)
        size += bytes_
    return parts


def part_name(event_type: str, number: int, sources: list[str]) -> str:
    """A part of one pane file keeps the pane's name; one of several is named by (hour, part)."""
    return posixpath.basename(sources[0]) if len(sources) == 1 else f"{event_type}-part{number:05d}.avro"


def plan_path(layout: Layout, hour_start: int) -> str:
    return partitions.join(layout.hour(layout.staging, hour_start), CLOSE_PLAN)


def plan_hour(
    layout: Layout,
    hour_start: int,
    closes_at: float,
    collected: list,
    replayed: bool,
    target_file_mb: int,
    num_shards: int | None = None,
    codec: str = files.AVRO_CODEC,
) -> dict | None:
    """The hour's plan, ``{"manifest", "parts": [{"path", "sources", "records", "codec"}], "counted", "index"}``:
    read from its staging folder if an earlier attempt (or run) saved one, else made from the hour's
    reports and saved there, before any file moves. None if the hour is published and its plan
    gone: nothing collected now is in it. With ``num_shards``, ``index`` holds the tasks that read the
    hour's ids for its late repeats (``transforms.id_index``), whose buckets are written before the
    marker as the parts are; each task's list of files is saved before the plan."""
    staging = layout.hour(layout.staging, hour_start)
    saved = plan_path(layout, hour_start)
    if files.exists(saved):
        return files.read_json(saved)
    if files.exists(layout.marker(hour_start)):
        return None
    sizes = files.sizes(partitions.join(staging, "*.avro"))
    staged = {path: (records, sizes.get(path, 0)) for kind, records, path in collected if kind == DELIVERED}
    superseded = superseded_ids(collected)
    folder = layout.hour(layout.delivered, hour_start)
    parts = []
    for number, sources in enumerate(group_into_parts(staged, target_file_mb * 1024 * 1024)):
        path = partitions.join(folder, part_name(layout.event_type, number, sources))
        left_out = sorted(i for source in sources for i in superseded.get(source, ()))
        records = sum(staged[s][0] for s in sources) - len(left_out)
        parts.append({"path": path, "sources": sources, "records": records, "left_out": left_out, "codec": codec})
    published = {part["path"]: part["records"] for part in parts}
    manifest = build_manifest(
        layout.event_type, hour_start, layout.window_seconds, closes_at, published, collected, replayed
    )
    counted = [[kind, records] for kind, records, path in collected if kind in COUNTED_WITHOUT_A_FILE]
    index = [] if num_shards is None else index_tasks({p: staged[p][0] for p in staged}, num_shards)
    plan = {"manifest": manifest, "parts": parts, "counted": counted, "index": index}
    save_task_sources(staging, index, list(staged))
    files.write_json(saved, plan)
    return plan


def superseded_ids(reports: list) -> dict[str, set[str]]:
    """The ids to leave out of each staged file: copies of a stopped run that this run delivered first."""
    left_out: dict[str, set[str]] = {}
    for _, _, (path, event_id) in (r for r in reports if r[0] == SUPERSEDED):
        left_out.setdefault(path, set()).add(event_id)
    return left_out


def unplanned(plan: dict | None, collected: list) -> list[tuple]:
    """The reports of ``collected`` that ``plan`` was not made from: a file the plan does not
    list, and a count beyond those it was made from (by kind and size)."""
    if plan is None:
        return list(collected)
    listed = {source for part in plan["parts"] for source in part["sources"]}
    listed |= {dead_letters["path"] for dead_letters in plan["manifest"]["dead_letter_files"]}
    # A plan saved before plans kept their counts counts nothing a later run collects.
    counted = collections.Counter((kind, records) for kind, records in plan.get("counted", []))
    left_out = {(s, i) for part in plan["parts"] for s in part["sources"] for i in part.get("left_out", ())}
    left = []
    for kind, records, path in collected:
        if kind == SUPERSEDED and tuple(path) in left_out:
            continue
        if path and path in listed:
            continue
        if not path and counted[(kind, records)]:
            counted[(kind, records)] -= 1
            continue
        left.append((kind, records, path))
    return left


def to_write(plan: dict) -> list[dict]:
    """The tasks an hour's plan sends on: its parts, and the read tasks of the index of its ids."""
    return plan["parts"] + as_chunks(plan.get("index", []))


def planned_writes(plan: dict) -> int:
    """What an hour's plan writes before its marker, each counted once by ``PublishWhenWrittenFn``: its parts,
    and the buckets of its index (each once all its shard's chunks were read; a read task counts for none)."""
    buckets = {task["index_of_shard"]: task["buckets"] for task in as_chunks(plan.get("index", []))}
    return len(plan["parts"]) + sum(buckets.values())


def write_part(layout: Layout, hour_start: int, part: dict) -> None:
    """Writes one part of a planned hour, unless the hour's marker says it is published. A part
    whose sources hold superseded copies (rare: only after a restart) is written record by
    record, without them; any other is copied block by block. Either way it has the codec its
    plan names (a plan saved before plans named one: deflate, the codec of then)."""
    if files.exists(layout.marker(hour_start)):
        return  # its staged files may be gone already: the part is in place
    if part.get("left_out"):
        files.rewrite_avro_without(part["sources"], part["path"], set(part["left_out"]), part_codec(part))
    else:
        files.concatenate_avro(part["sources"], part["path"], part_codec(part))


def planned_sources(layout: Layout, hour_start: int) -> list[str]:
    """The staged files of the hour's saved plan (read tasks of plans saved before they had lists read it)."""
    return [source for part in files.read_json(plan_path(layout, hour_start))["parts"] for source in part["sources"]]


def part_codec(part: dict) -> str:
    return part.get("codec", files.AVRO_CODEC)


def finish_hour(layout: Layout, hour_start: int) -> dict:
    """Once every part is written: the marker, then the read tasks' lists, the plan's staged files and the
    plan deleted; returns the manifest. The plan goes last, so an attempt that finds none (one before it got
    that far, its commit lost) finds the marker, and reads the manifest there."""
    saved = plan_path(layout, hour_start)
    if not files.exists(saved):
        return files.read_json(layout.marker(hour_start))
    plan = files.read_json(saved)
    if not files.exists(layout.marker(hour_start)):
        files.write_json(layout.marker(hour_start), plan["manifest"])
    remove_task_sources(layout.hour(layout.staging, hour_start))
    files.delete_existing([source for part in plan["parts"] for source in part["sources"]] + [saved])
    return plan["manifest"]


class WritePartFn(beam.DoFn):
    """``(hour start, part)`` in; ``(hour start, (WRITTEN, 1))`` out once the part is written."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def setup(self):
        use_emulator_credentials()

    def process(self, hour_part):
        hour_start, part = hour_part
        write_part(self.layout, hour_start, part)
        yield hour_start, (WRITTEN, 1)


@ANY_OUTPUT
class PublishWhenWrittenFn(beam.DoFn):
    """Counts an hour's writes against its plan's (``planned_writes``: its parts and its index's buckets,
    each sent as ``(WRITTEN, 1)`` once it is written); when all are written, publishes it."""

    PARTS = ReadModifyWriteStateSpec("parts", VarIntCoder())
    WRITTEN_PARTS = ReadModifyWriteStateSpec("written", VarIntCoder())

    def __init__(self, settings):
        self.layout = settings.layout
        self.tier = settings.event_type.tier
        self.allowed_lateness_seconds = settings.allowed_lateness_seconds
        self.streaming = not settings.bounded

    def setup(self):
        use_emulator_credentials()
        self.delivered = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.DELIVERED)
        self.closed_hours = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.HOURS_CLOSED)
        self.close_delay = beam.metrics.Metrics.distribution(slo.NAMESPACE, slo.CLOSE_DELAY_SECONDS)
        self.overdue = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.HOURS_OVERDUE)

    def process(self, hour_progress, parts=beam.DoFn.StateParam(PARTS), written=beam.DoFn.StateParam(WRITTEN_PARTS)):
        hour_start, (kind, count) = hour_progress
        if kind == PLANNED:
            parts.write(count)
        else:
            written.write((written.read() or 0) + count)
        if parts.read() is None or (written.read() or 0) < parts.read():
            return
        manifest = finish_hour(self.layout, hour_start)
        parts.clear()
        written.clear()
        self.delivered.inc(manifest["accounting"]["delivered"])
        self.closed_hours.inc()
        if self.streaming:  # a backfill closes hours of the past: its delay says nothing
            self._measure_timeliness(hour_start)
        _LOG.info(
            "closed %s %s: %d records in %d files",
            self.layout.event_type,
            partitions.iso_utc(hour_start),
            manifest["accounting"]["delivered"],
            len(manifest["files"]),
        )
        yield self.layout.marker(hour_start)

    def _measure_timeliness(self, hour_start: int) -> None:
        delay = wall_clock() - (hour_start + self.layout.window_seconds)
        self.close_delay.update(int(delay))
        if slo.is_overdue(self.tier, delay, self.allowed_lateness_seconds):
            self.overdue.inc()


class PublishHours(beam.PTransform):
    """Planned hours in, as ``CloseHour`` emits them: ``parts`` (``(hour start, part)``, also the index's
    read tasks) and ``planned`` (``(hour start, (PLANNED, planned_writes))``); marker paths out, in the
    global window. Parts and read tasks are spread over the workers (else they would run where the close ran,
    one after another), the ids shuffled to groups of buckets (``transforms.index_buckets``); the hour is
    published, keyed by hour, when the last of its parts and buckets is written."""

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def expand(self, planned_hours):
        layout = self.settings.layout
        # Out of the hour windows: an hour's elements carry their close time, which a window
        # function would put in the next hour (a reshuffle windows again), and state kept per
        # hour key is dropped once the hour is published.
        spread = (
            planned_hours["parts"]
            | "PartsOutOfTheirHours" >> beam.WindowInto(GlobalWindows())
            | "SpreadParts" >> beam.Reshuffle()
        )
        written = (
            spread
            | "Parts" >> beam.Filter(lambda hour_part: not is_index_task(hour_part[1]))
            | "WriteParts" >> beam.ParDo(WritePartFn(layout))
        )
        buckets = (
            spread
            | "IndexReadTasks" >> beam.Filter(lambda hour_part: is_index_task(hour_part[1]))
            | "ReadIndexChunks" >> beam.ParDo(ReadIndexChunkFn(layout, planned_sources)).with_output_types(GROUP_KEY)
            | "WriteIndexBuckets" >> beam.ParDo(WriteIndexBucketFn(layout))
            | "BucketsWritten" >> beam.MapTuple(lambda hour_start, buckets: (hour_start, (WRITTEN, buckets)))
        )
        planned = planned_hours["planned"] | "PlansOutOfTheirHours" >> beam.WindowInto(GlobalWindows())
        return (
            (planned, written, buckets)
            | "PlansAndParts" >> beam.Flatten().with_output_types(tuple[int, typing.Any])  # a deterministic key
            | "PublishWhenWritten" >> beam.ParDo(PublishWhenWrittenFn(self.settings))
        )

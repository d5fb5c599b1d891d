"""Publish a closed hour: compact its staged pane files into parts, then write ``_SUCCESS``.

``CloseHour`` decides that an hour is closed and saves its *plan* in the hour's staging
folder (``_CLOSING.json``) before anything moves: which staged files make which part,
and the manifest. Then the index of the hour's ids is written, which finds the copies of an
id after its first (``transforms.close_repeats``), and then the parts, side by side, on any
worker (``transforms.publish_hours``): a part is its pane files' Avro blocks in one file of
about ``--target_file_mb``, compressed, less those copies. Panes are staged uncompressed, so
each record is compressed once, here, and none is decoded.
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
import posixpath
import re

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.partitions import Layout
from transforms.close_repeats import as_written, later_copies_of_part, note_written, plan_places, remove_close_notes
from transforms.id_index import as_chunks, index_tasks, remove_task_sources, save_task_sources
from transforms.reports import DEAD_LETTERED, DELIVERED, DUPLICATES, FORGOTTEN

CLOSE_PLAN = "_CLOSING.json"  # in the hour's staging folder while it closes
PLANNED, WRITTEN = "planned", "written"
COUNTED_WITHOUT_A_FILE = (DUPLICATES, FORGOTTEN)  # the reports a manifest counts that name no file
PANE_NUMBER = re.compile(r"-[plq]\d+(?:-s\d+(?:-w[^/]*)?\.avro)?$")  # what follows the run in a pane file's name


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
    duplicates = sum(records for kind, records, _ in reports if kind == DUPLICATES)
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
        file_run = PANE_NUMBER.sub("", posixpath.basename(path))
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
    folder = layout.hour(layout.delivered, hour_start)
    parts = []
    for number, sources in enumerate(group_into_parts(staged, target_file_mb * 1024 * 1024)):
        path = partitions.join(folder, part_name(layout.event_type, number, sources))
        records = sum(staged[s][0] for s in sources)
        parts.append({"path": path, "sources": sources, "records": records, "codec": codec})
    published = {part["path"]: part["records"] for part in parts}
    manifest = build_manifest(
        layout.event_type, hour_start, layout.window_seconds, closes_at, published, collected, replayed
    )
    counted = [[kind, records] for kind, records, path in collected if kind in COUNTED_WITHOUT_A_FILE]
    index = [] if num_shards is None else index_tasks({p: staged[p][0] for p in staged}, num_shards)
    plan = {"manifest": manifest, "parts": parts, "counted": counted, "index": index}
    save_task_sources(staging, index, plan_places(parts))
    files.write_json(saved, plan)
    return plan


def unplanned(plan: dict | None, collected: list) -> list[tuple]:
    """The reports of ``collected`` that ``plan`` was not made from: a file the plan does not
    list, and a count beyond those it was made from (by kind and size)."""
    if plan is None:
        return list(collected)
    listed = {source for part in plan["parts"] for source in part["sources"]}
    listed |= {dead_letters["path"] for dead_letters in plan["manifest"]["dead_letter_files"]}
    # A plan saved before plans kept their counts counts nothing a later run collects.
    counted = collections.Counter((kind, records) for kind, records in plan.get("counted", []))
    left = []
    for kind, records, path in collected:
        if path and path in listed:
            continue
        if not path and counted[(kind, records)]:
            counted[(kind, records)] -= 1
            continue
        left.append((kind, records, path))
    return left


def index_to_read(plan: dict) -> list[dict]:
    """The read tasks of the index of an hour's ids, which ``CloseHour`` sends on once it saved the plan."""
    return as_chunks(plan.get("index", []))


def buckets_planned(plan: dict) -> int:
    """The buckets of an hour's index, each written once all its shard's chunks were read: the parts wait for
    every one (``PublishHours``), since a bucket's key lists the later copies the parts leave out."""
    return sum({task["index_of_shard"]: task["buckets"] for task in index_to_read(plan)}.values())


def parts_to_write(plan: dict) -> list[dict]:
    """An hour's parts, each with its number in the plan (where the index lists its later copies)."""
    return [part | {"number": number} for number, part in enumerate(plan["parts"])]


def write_part(layout: Layout, hour_start: int, part: dict) -> None:
    """Writes one part of a planned hour, unless the hour's marker says it is published. A part whose
    sources hold later copies of ids (``close_repeats``), or superseded ones (a plan saved by an earlier
    version), is written less those, its records cut out of their blocks, and says how many it holds; any
    other is copied block by block. Either way it has the codec its plan names (a plan saved before plans
    named one: deflate, the codec of then)."""
    if files.exists(layout.marker(hour_start)):
        return  # its staged files may be gone already: the part is in place
    staging = layout.hour(layout.staging, hour_start)
    sources = part["sources"]
    if part.get("left_out"):  # superseded copies, listed by a plan of state layout 5 or earlier
        leave_out = {source: set(part["left_out"]) for source in sources}
    else:
        leave_out = later_copies_of_part(staging, part["number"], sources)
        if files.exists(layout.marker(hour_start)):
            return  # published meanwhile: its lists may be gone already
    if not leave_out:
        files.concatenate_avro(sources, part["path"], part_codec(part))
        return
    records = files.rewrite_avro_without(sources, part["path"], leave_out, part_codec(part))
    if records != part["records"]:
        note_written(staging, part["number"], part["path"], records)


def planned_sources(layout: Layout, hour_start: int) -> list[str]:
    """The staged files of the hour's saved plan (read tasks of plans saved before they had lists read it)."""
    return [source for part in files.read_json(plan_path(layout, hour_start))["parts"] for source in part["sources"]]


def part_codec(part: dict) -> str:
    return part.get("codec", files.AVRO_CODEC)


def finish_hour(layout: Layout, hour_start: int) -> dict:
    """Once every part is written: the marker, its manifest the plan's as the parts were written
    (``close_repeats.as_written``), then the plan's staged files, the read tasks' lists, the later copies'
    lists and the parts' notes, and the plan deleted; returns the manifest. The plan goes last, so an
    attempt that finds none (one before it got that far, its commit lost) finds the marker, and reads the
    manifest there."""
    saved = plan_path(layout, hour_start)
    if not files.exists(saved):
        return files.read_json(layout.marker(hour_start))
    plan, staging = files.read_json(saved), layout.hour(layout.staging, hour_start)
    if files.exists(layout.marker(hour_start)):
        manifest = files.read_json(layout.marker(hour_start))
    else:
        manifest = as_written(staging, plan["manifest"])
        files.write_json(layout.marker(hour_start), manifest)
    # The staged files go before the lists of later copies: an attempt at a part that found no marker (a stale
    # one, or an overlapping run's) and then no lists would write every copy over the published part, but
    # without its sources it fails, and its retry finds the marker.
    files.delete_existing([source for part in plan["parts"] for source in part["sources"]])
    remove_task_sources(staging)
    remove_close_notes(staging)
    files.delete_existing([saved])
    return manifest

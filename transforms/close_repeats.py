"""Repeats dropped at the close: every copy of an id after the first in its hour, found by the index.

The close's index (``transforms.id_index``) reads every staged id of the hour once, and a key of
``WriteIndexBuckets`` holds every copy of the ids of its group of buckets, whatever file, pane or run
staged them. Each read task names its files by their place in the plan, ``(part, place among the part's
sources)``, so each id goes to its bucket's key as ``(entry, part, place)``. That key keeps the first copy
in plan order and lists the later ones per part (``later_copies``), in the hour's staging folder, before it
counts its buckets written. The parts are written only once every bucket is (``PublishHours``): a part
cuts its later copies out of its sources (``files.rewrite_avro_without``) and, holding fewer records
than planned, says how many it holds beside the plan (``note_written``), which the marker's manifest then
counts (``as_written``): ``in = delivered + duplicates + dead_lettered`` as before, with the repeats among
the duplicates.

Every file here has a fixed name, so a retried key or part rewrites what its lost try wrote, from the
same state or the same sources.
"""

from __future__ import annotations

from event_delivery.cloud import files
from event_delivery.contract import partitions
from transforms.id_index import index_entry

REPEATS_PREFIX = "_CLOSING-repeats-"  # ``p<part>-s<shard>-g<group>.json``: [[place, entry], ...]
WRITTEN_PREFIX = "_CLOSING-written-"  # ``p<part>.json``: {"path", "records"} of a part with fewer records


def plan_places(parts: list[dict]) -> dict[str, list[int]]:
    """Each staged file of a plan's ``parts`` by its place there: ``[part, place among its sources]``."""
    return {
        source: [number, place] for number, part in enumerate(parts) for place, source in enumerate(part["sources"])
    }


def later_copies(copies: list[tuple]) -> dict[int, list[list]]:
    """Of ``(entry, part, place)`` copies, all but the first of each entry in plan order, by part:
    ``{part: [[place, entry], ...]}``; empty when no entry repeats. (A pane holds an id once, so two
    copies never share a place.)"""
    first: dict[str, tuple[int, int]] = {}
    for entry, part, place in copies:
        seen = first.get(entry)
        if seen is None or (part, place) < seen:
            first[entry] = (part, place)
    later: dict[int, list[list]] = {}
    if len(first) < len(copies):
        for entry, part, place in copies:
            if first[entry] != (part, place):
                later.setdefault(part, []).append([place, entry])
    return later


def save_later_copies(staging: str, shard: int, group: int, later: dict[int, list[list]]) -> None:
    for part, copies in later.items():
        files.write_json(
            partitions.join(staging, f"{REPEATS_PREFIX}p{part:05d}-s{shard:03d}-g{group:05d}.json"), copies
        )


class Entries(frozenset):
    """Index entries (``id_index.index_entry``) that answer ``in`` for the ids they stand for."""

    def __contains__(self, event_id) -> bool:
        return frozenset.__contains__(self, index_entry(event_id))


def later_copies_of_part(staging: str, number: int, sources: list[str]) -> dict[str, Entries]:
    """What the part numbered ``number`` of ``sources`` leaves out, per source: the later copies that the
    index's keys listed for it (``save_later_copies``), every one of them written before the part is."""
    by_place: dict[int, set[str]] = {}
    for path in files.glob(partitions.join(staging, f"{REPEATS_PREFIX}p{number:05d}-*.json")):
        for place, entry in files.read_json(path):
            by_place.setdefault(place, set()).add(entry)
    return {sources[place]: Entries(entries) for place, entries in by_place.items()}


def note_written(staging: str, number: int, path: str, records: int) -> None:
    files.write_json(
        partitions.join(staging, f"{WRITTEN_PREFIX}p{number:05d}.json"), {"path": path, "records": records}
    )


def as_written(staging: str, manifest: dict) -> dict:
    """The plan's ``manifest`` with the records its parts hold as written (``note_written``): the later
    copies they left out are counted as duplicates."""
    written = {d["path"]: d["records"] for d in map(files.read_json, files.glob(_written_pattern(staging)))}
    if not written:
        return manifest
    published = [f | {"records": written.get(f["path"], f["records"])} for f in manifest["files"]]
    accounting = manifest["accounting"]
    delivered = sum(f["records"] for f in published)
    dropped = accounting["delivered"] - delivered
    accounting = accounting | {"delivered": delivered, "duplicates": accounting["duplicates"] + dropped}
    return manifest | {"files": published, "accounting": accounting}


def remove_close_notes(staging: str) -> None:
    """Deletes the later copies' lists and the parts' counts in the hour's ``staging`` folder."""
    pattern = partitions.join(staging, f"{REPEATS_PREFIX}*.json")
    files.delete_existing(files.glob(pattern) + files.glob(_written_pattern(staging)))


def _written_pattern(staging: str) -> str:
    return partitions.join(staging, f"{WRITTEN_PREFIX}*.json")

"""The audit's scan: a type's delivered, staged, late, dead-letter and audit roots read into
per-hour counts, the output contract checked, and each hour's close judged by ``slo.is_overdue``.

It may run while jobs write: when a close moves a file the scan listed, it starts over
from a fresh listing.
"""

from __future__ import annotations

import collections
import posixpath
import time

from event_delivery.cloud import files
from event_delivery.contract import partitions, slo
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import Tier, load_registry
from tools.ops.audit_model import TypeAudit


def _partition_files(root: str, event_type: str, pattern: str = "*") -> dict[str, list[str]]:
    by_partition = collections.defaultdict(list)
    prefix = partitions.join(root, event_type) + "/"
    for path in files.glob(partitions.join(root, event_type, "dt=*", "hr=*", pattern)):
        by_partition[posixpath.dirname(path[len(prefix) :])].append(path)
    return by_partition


def hours_settled(layout: Layout) -> bool:
    """True when nothing waits in staging and every hour folder has its marker.

    It only lists files, so it is safe to call while a job is publishing an hour.
    """
    if files.glob(partitions.join(layout.staging, layout.event_type, "dt=*", "hr=*", "*.avro")):
        return False
    folders = _partition_files(layout.delivered, layout.event_type).values()
    return all(any(posixpath.basename(p) == partitions.SUCCESS_MARKER for p in paths) for paths in folders)


def _check_in_hour(audit, partition, records, window_seconds, what) -> None:
    start, end = partitions.partition_bounds(partition, window_seconds)
    for record in records:
        millis = int(record["received_at"].timestamp() * 1000)
        if not start <= millis < end:
            audit.problems.append(f"{what} {partition}: a record's received_at is outside the partition")
            return


class FileMoved(Exception):
    """A listed file was gone when the audit came to read it: a close moved it meanwhile."""


def _read(read, path: str):
    try:
        return read(path)
    except Exception:
        if files.exists(path):
            raise
        raise FileMoved(path) from None


def audit_type(
    layout: Layout, attempts: int = 5, now: float | None = None, allowed_lateness_seconds: int | None = None
) -> TypeAudit:
    """Counts every outcome of a type's messages, per hour, from its files under ``layout``,
    joins the auditor's counts, and checks the output contract; a close that moves files
    meanwhile starts it over.

    Each hour of a registered type is judged by ``slo.is_overdue``: a closed hour by its
    close delay, an open one by how long it has been over at ``now``. ``allowed_lateness_seconds``
    is the jobs' own, when they ran with one (default: the tier's).
    """
    now = time.time() if now is None else now
    for attempt in range(1, attempts + 1):
        try:
            audit = _audit_type(layout)
            break
        except FileMoved:
            if attempt == attempts:
                raise
    registry = load_registry()
    if layout.event_type in registry:
        _judge_closes(audit, layout.window_seconds, registry[layout.event_type].tier, allowed_lateness_seconds, now)
    return audit


def _judge_closes(audit: TypeAudit, window_seconds: int, tier: Tier, allowed_lateness_seconds, now: float) -> None:
    for partition, hour in audit.hours.items():
        end = partitions.partition_bounds(partition, window_seconds)[1] / 1000
        if not hour.closed and now > end:
            hour.open_for_seconds = now - end
        delay = hour.close_delay_so_far  # None for an hour closed by a replay: not judged
        hour.overdue = delay is not None and slo.is_overdue(tier, delay, allowed_lateness_seconds)


def _audit_type(layout: Layout) -> TypeAudit:
    event_type, output_root, window_seconds = layout.event_type, layout.delivered, layout.window_seconds
    audit = TypeAudit(event_type)
    for partition, paths in _partition_files(output_root, event_type).items():
        hour = audit.hour(partition)
        counts = {}
        for path in paths:
            if posixpath.basename(path) == partitions.SUCCESS_MARKER:
                continue
            records = _read(files.read_avro, path)
            counts[path] = len(records)
            hour.delivered += len(records)
            hour.delivered_ids.extend(record["event_id"] for record in records)
            _check_in_hour(audit, partition, records, window_seconds, "delivered")
        if len(set(hour.delivered_ids)) != len(hour.delivered_ids):
            audit.problems.append(f"delivered {partition}: duplicate event ids")
        marker = partitions.join(output_root, event_type, partition, partitions.SUCCESS_MARKER)
        if files.exists(marker):
            hour.closed = True
            manifest = _read(files.read_json, marker)
            if not manifest.get("replayed"):  # a backfill's close time says nothing about timeliness
                hour_end = partitions.partition_bounds(partition, window_seconds)[1] / 1000
                hour.close_delay_seconds = files.updated_seconds(marker) - hour_end
            hour.duplicates = manifest["accounting"]["duplicates"]
            listed = {entry["path"]: entry["records"] for entry in manifest["files"]}
            if listed != counts:
                audit.problems.append(f"delivered {partition}: _SUCCESS lists other files or counts than the folder")
            if manifest["accounting"]["delivered"] != hour.delivered:
                audit.problems.append(f"delivered {partition}: _SUCCESS delivered count differs from the files")
    for partition, paths in _partition_files(layout.staging, event_type, "*.avro").items():
        audit.hour(partition).staged += sum(_read(files.count_avro_records, path) for path in paths)
    for partition, paths in _partition_files(layout.late, event_type, "*.avro").items():
        for path in paths:
            records = _read(files.read_avro, path)
            audit.hour(partition).late += len(records)
            _check_in_hour(audit, partition, records, window_seconds, "late")
    for partition, paths in _partition_files(layout.late, event_type, partitions.LATE_DUPLICATES_PATTERN).items():
        audit.hour(partition).duplicates += sum(_read(files.read_json, path)["duplicates"] for path in paths)
    for partition, paths in _partition_files(layout.dead_letter, event_type).items():
        hour = audit.hour(partition)
        for path in paths:
            records = _read(files.read_avro, path)
            hour.dead_lettered += len(records)
            hour.dead_letter_kinds.update(record["error_kind"].lower() for record in records)
    if layout.audit is not None:
        for partition, paths in _partition_files(layout.audit, event_type, partitions.AUDIT_COUNTS).items():
            hour = audit.hour(partition)
            counted = _read(files.read_json, paths[0])
            hour.published, hour.distinct_ids = counted["published"], counted["distinct_ids"]
            hour.counts_source = counted["source"]
    return audit

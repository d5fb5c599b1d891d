"""Audit delivered output: count every message's outcome and check the contract.

For each type and hour it counts delivered, duplicate, late and dead-lettered
messages from the files themselves, and checks that delivered ids are unique per
hour, that every record sits in the folder of its own hour, and that each
``_SUCCESS`` manifest matches the files beside it. It may run while jobs write: when
a close moves a file the audit listed, the audit starts over from a fresh listing::

    python -m event_delivery.ops.audit --storage_root gs://event-delivery-local --window_seconds 10
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import posixpath
import sys

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import load_registry


@dataclasses.dataclass
class HourAudit:
    partition: str
    delivered: int = 0
    duplicates: int = 0
    late: int = 0
    dead_lettered: int = 0
    staged: int = 0
    closed: bool = False
    dead_letter_kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    delivered_ids: list = dataclasses.field(default_factory=list)

    @property
    def total(self) -> int:
        return self.delivered + self.duplicates + self.late + self.dead_lettered


@dataclasses.dataclass
class TypeAudit:
    event_type: str
    hours: dict = dataclasses.field(default_factory=dict)
    problems: list = dataclasses.field(default_factory=list)

    def hour(self, partition: str) -> HourAudit:
        return self.hours.setdefault(partition, HourAudit(partition))

    def total(self, name: str) -> int:
        return sum(getattr(hour, name) for hour in self.hours.values())

    @property
    def closed_hours(self) -> int:
        return sum(hour.closed for hour in self.hours.values())

    @property
    def settled(self) -> bool:
        """Every hour with delivered data has closed and nothing waits in staging."""
        return all(hour.closed or not hour.delivered for hour in self.hours.values()) and not self.total("staged")


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


def audit_type(layout: Layout, attempts: int = 5) -> TypeAudit:
    """Counts every outcome of a type's messages, per hour, from its files under ``layout``,
    and checks the output contract; a close that moves files meanwhile starts it over."""
    for attempt in range(1, attempts + 1):
        try:
            return _audit_type(layout)
        except FileMoved:
            if attempt == attempts:
                raise


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
    return audit


def main(argv=None) -> int:
    registry = load_registry()
    parser = argparse.ArgumentParser(prog="python -m event_delivery.ops.audit", description=__doc__.split("\n")[0])
    parser.add_argument("--storage_root", required=True, help="The jobs' --storage_root.")
    parser.add_argument("--window_seconds", type=int, default=partitions.HOUR_SECONDS)
    parser.add_argument("--event_type", action="append", choices=sorted(registry), help="Default: every type.")
    args = parser.parse_args(argv)
    from event_delivery.cloud import preflight
    from event_delivery.cloud.clients import use_emulator_credentials

    root = args.storage_root.rstrip("/")
    with preflight.exit_on_failure(parser.prog):
        preflight.check_root(root, create=False)
    use_emulator_credentials()
    report = {}
    failed = False
    for name in args.event_type or sorted(registry):
        audit = audit_type(Layout.under(root, name, args.window_seconds))
        failed |= bool(audit.problems)
        report[name] = {
            "delivered": audit.total("delivered"),
            "duplicates": audit.total("duplicates"),
            "late": audit.total("late"),
            "dead_lettered": audit.total("dead_lettered"),
            "closed_hours": audit.closed_hours,
            "staged_in_open_hours": audit.total("staged"),
            "problems": audit.problems,
        }
    print(json.dumps(report, indent=2, sort_keys=True))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Audit delivered output: count every message's outcome and check the contract.

For each type and hour it counts delivered, duplicate, late and dead-lettered
messages from the files themselves, and checks that delivered ids are unique per
hour, that every record sits in the folder of its own hour, and that each
``_SUCCESS`` manifest matches the files beside it. It may run while jobs write: when
a close moves a file the audit listed, the audit starts over from a fresh listing.

It joins them with the auditor's independent count of what was published
(``<storage_root>/audit/<type>/dt=…/hr=…/counts.json``, see ``pipelines.auditor``):
lost = published − (delivered + duplicates + late + dead-lettered), known once the hour
has its count and its marker. And it times each close: the close delay is when the
marker was written (its object's time) minus the hour's end. It prints one row per type
and hour (``--json`` for a document instead) and exits with code 1 when any hour lost
data (lost ≠ 0), is overdue (no marker, or a late one, past the tier's close delay budget
after the hour's end: ``slo.is_overdue``), or broke the contract::

    python -m event_delivery.ops.audit --storage_root gs://event-delivery-local --window_seconds 10
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import posixpath
import sys
import time

from event_delivery.cloud import files
from event_delivery.contract import partitions, slo
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import Tier, load_registry


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
    published: int | None = None  # the auditor's count of the hour's messages; None without one
    distinct_ids: int | None = None  # the auditor's count of their distinct event ids
    close_delay_seconds: float | None = None  # when the marker was written minus the hour's end
    open_for_seconds: float | None = None  # not closed: how long since the hour's end, at the audit's time
    counts_source: str | None = None  # where the auditor counted: subscription or producer_counts
    overdue: bool = False  # no marker past the close deadline, or one written after it (``slo.is_overdue``)

    @property
    def total(self) -> int:
        return self.delivered + self.duplicates + self.late + self.dead_lettered

    @property
    def lost(self) -> int | None:
        """Published messages in no output; None until the hour has the auditor's count and its marker.

        Negative when the outputs hold more than was published (a message written twice).
        """
        if self.published is None or not self.closed:
            return None
        return self.published - self.total

    @property
    def close_delay_so_far(self) -> float | None:
        """The close delay; for an hour still open, how long it has been over so far (None before its end)."""
        return self.close_delay_seconds if self.closed else self.open_for_seconds

    @property
    def dead_letter_rate(self) -> float:
        """Of what was published (by the auditor), or of what was accounted for without its count."""
        base = self.published if self.published is not None else self.total
        return self.dead_lettered / base if base else 0.0

    @property
    def failures(self) -> list[str]:
        """Why this hour fails the audit: data lost, or the close overdue."""
        reasons = [f"lost {self.lost}"] if self.lost else []
        return reasons + (["overdue"] if self.overdue else [])


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

    @property
    def reconciled(self) -> bool:
        """Every closed hour that has output or a count has the auditor's count, and its messages
        are all accounted for (lost = 0). A closed hour with neither had nothing to lose."""
        checked = [h for h in self.hours.values() if h.closed and (h.total or h.published is not None)]
        return all(hour.lost == 0 for hour in checked)

    @property
    def failed_hours(self) -> dict[str, list[str]]:
        """The hours that lost data or are overdue, with why."""
        return {p: hour.failures for p, hour in sorted(self.hours.items()) if hour.failures}


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


COLUMNS = (
    ("type", None),
    ("hour", None),
    ("published", "published"),
    ("distinct ids", "distinct_ids"),
    ("delivered", "delivered"),
    ("duplicates", "duplicates"),
    ("late", "late"),
    ("dead-lettered", "dead_lettered"),
    ("lost", "lost"),
    ("close delay", "close_delay_seconds"),
    ("status", None),
)


def _status(hour: HourAudit) -> str:
    if hour.failures:
        return ", ".join(hour.failures).upper()
    if not hour.closed:
        return "open"
    if hour.published is None:
        return "empty" if not hour.total else "no count"  # an empty hour is counted by no one
    return "ok"


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}s" if isinstance(value, float) else str(value)


def format_table(audits: list[TypeAudit]) -> str:
    """One row per type and hour: the auditor's counts, the outcomes, lost and the close delay."""
    rows = [tuple(name for name, _ in COLUMNS)]
    for audit in audits:
        for partition, hour in sorted(audit.hours.items()):
            values = [audit.event_type, partition, *(_cell(getattr(hour, f)) for _, f in COLUMNS[2:-1]), _status(hour)]
            rows.append(tuple(values))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(
            c.ljust(w) if i < 2 or i == len(COLUMNS) - 1 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def _document(audit: TypeAudit) -> dict:
    hours = {
        partition: {
            "published": hour.published,
            "distinct_ids": hour.distinct_ids,
            **{name: getattr(hour, name) for name in ("delivered", "duplicates", "late", "dead_lettered", "staged")},
            "lost": hour.lost,
            "closed": hour.closed,
            "close_delay_seconds": hour.close_delay_seconds,
            "overdue": hour.overdue,
        }
        for partition, hour in sorted(audit.hours.items())
    }
    return {
        "delivered": audit.total("delivered"),
        "duplicates": audit.total("duplicates"),
        "late": audit.total("late"),
        "dead_lettered": audit.total("dead_lettered"),
        "closed_hours": audit.closed_hours,
        "staged_in_open_hours": audit.total("staged"),
        "problems": audit.problems,
        "failed_hours": audit.failed_hours,
        "hours": hours,
    }


def main(argv=None) -> int:
    registry = load_registry()
    parser = argparse.ArgumentParser(prog="python -m event_delivery.ops.audit", description=__doc__.split("\n")[0])
    parser.add_argument("--storage_root", required=True, help="The jobs' --storage_root.")
    parser.add_argument("--window_seconds", type=int, default=partitions.HOUR_SECONDS)
    parser.add_argument("--event_type", action="append", choices=sorted(registry), help="Default: every type.")
    parser.add_argument(
        "--allowed_lateness_seconds",
        type=int,
        help="The jobs' --allowed_lateness_seconds, when they ran with one: an hour is overdue after the "
        "window, this and the tier's close margin. Default: the tier's close deadline.",
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON document per type instead of the table.")
    args = parser.parse_args(argv)
    from event_delivery.cloud import preflight
    from event_delivery.cloud.clients import use_emulator_credentials

    root = args.storage_root.rstrip("/")
    with preflight.exit_on_failure(parser.prog):
        preflight.check_root(root, create=False)
    use_emulator_credentials()
    audits = []
    for name in args.event_type or sorted(registry):
        layout = Layout.under(root, name, args.window_seconds)
        audits.append(audit_type(layout, allowed_lateness_seconds=args.allowed_lateness_seconds))
    if args.json:
        print(json.dumps({audit.event_type: _document(audit) for audit in audits}, indent=2, sort_keys=True))
    else:
        print(format_table(audits))
        for audit in audits:
            for problem in audit.problems:
                print(f"problem in {audit.event_type}: {problem}")
            for partition, failures in audit.failed_hours.items():
                print(f"{audit.event_type} {partition}: {', '.join(failures)}")
    failed = any(audit.problems or audit.failed_hours for audit in audits)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

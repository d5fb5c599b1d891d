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

    python -m tools.ops.audit --storage_root gs://event-delivery-local --window_seconds 10

The counts are ``audit_model``, read by ``audit_scan``; this module prints them.
"""

from __future__ import annotations

import argparse
import json
import sys

from event_delivery.contract import partitions
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import load_registry
from tools.ops.audit_model import HourAudit, TypeAudit
from tools.ops.audit_scan import audit_type

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
    parser = argparse.ArgumentParser(prog="python -m tools.ops.audit", description=__doc__.split("\n")[0])
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

    root = preflight.storage_to_read(parser.prog, args.storage_root)
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

"""The report: one static HTML page of every type's hours against its tier's service levels.

Per type, with hours on the x-axis: how long each hour took to close against the tier's
budget, what became of its messages (delivered, duplicates, late, dead-lettered, and lost
against the auditor's count of what was published), its dead-letter kinds, and a summary
row, green where the SLOs hold and red where they do not. It is built from the
``_SUCCESS`` manifests and files (``audit_type``) and the auditor's ``counts.json``
(``report_model``), drawn as SVG charts (``report_charts``) on one HTML page with inline CSS
(``report_page``), so it needs no network to view, and every number a chart shows is also
in a table cell (``data-type``, ``data-hour``, ``data-metric``)::

    python -m tools.ops.report --storage_root gs://event-delivery-local --window_seconds 10 \\
        --output .demo/report.html
"""

from __future__ import annotations

import argparse
import datetime
import sys

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.registry import load_registry
from tools.ops.report_model import collect
from tools.ops.report_page import render


def write_report(storage_root: str, window_seconds: int, event_types, output: str) -> str:
    """Writes the report of ``event_types`` to ``output`` (a local path or gs://); returns ``output``."""
    storage_root = storage_root.rstrip("/")
    reports = [collect(storage_root, name, window_seconds) for name in event_types]
    page = render(reports, storage_root, datetime.datetime.now(datetime.timezone.utc))
    files.write_bytes(output, page.encode("utf-8"))
    return output


def main(argv=None) -> int:
    registry = load_registry()
    parser = argparse.ArgumentParser(prog="python -m tools.ops.report", description=__doc__.split("\n")[0])
    parser.add_argument("--storage_root", required=True, help="The jobs' --storage_root.")
    parser.add_argument("--window_seconds", type=int, default=partitions.HOUR_SECONDS)
    parser.add_argument("--event_type", action="append", choices=sorted(registry), help="Default: every type.")
    parser.add_argument("--output", default="report.html", help="The HTML file to write (local or gs://).")
    args = parser.parse_args(argv)
    from event_delivery.cloud import preflight

    root = preflight.storage_to_read(parser.prog, args.storage_root)
    print(write_report(root, args.window_seconds, args.event_type or sorted(registry), args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())

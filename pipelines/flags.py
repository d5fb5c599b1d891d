"""The flags the jobs of a type share, declared once, and how each job and tool shows its ``--help``.

The delivery job and its auditor are configured alike: the type, its storage root, its
hours and their lateness (``HourOptions``). Each job reads them with
``options.view_as(HourOptions)`` and its own flags with its own options class
(``DeliveryOptions``, ``AuditorOptions``), so a
process that loads both (a test, a tool that builds both jobs) parses every flag once.
Nothing here comes from ``transforms/``: the auditor shares no code with delivery.
"""

from __future__ import annotations

import argparse
import sys

from apache_beam.options.pipeline_options import PipelineOptions

from event_delivery.contract import counts, partitions
from event_delivery.contract.registry import TIERS, load_registry


class HourOptions(PipelineOptions):
    """The type, its storage root and its hours: the flags of every job of a type."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_hour_arguments(parser)
        add_trigger_argument(parser)


def add_hour_arguments(parser) -> None:
    group = parser.add_argument_group("type and hours")
    group.add_argument("--event_type", choices=sorted(load_registry()), help="The event type (one job per type).")
    group.add_argument(
        "--storage_root",
        help="Where the type's output goes, a gs:// URL or a local folder: its delivered/, late/ and "
        "dead-letter/ folders (delivery's output roots default to them), and audit/, where the auditor "
        "writes its counts.",
    )
    group.add_argument(
        "--window_seconds",
        type=int,
        default=partitions.HOUR_SECONDS,
        help="Bucket length; must divide 3600. Shorter buckets are for tests and demos. Default: 3600.",
    )
    group.add_argument(
        "--allowed_lateness_seconds",
        type=int,
        help="How long after a bucket ends it stays open. Default: the type's tier ("
        + ", ".join(f"{t.name} {t.allowed_lateness_seconds}" for t in TIERS.values())
        + ").",
    )
    group.add_argument(
        "--late_horizon_seconds",
        type=int,
        default=counts.LATE_HORIZON_SECONDS,
        help="Events stamped further back than this on arrival are dead-lettered by delivery (kind "
        "bad_timestamp), so that it never holds state for them, and counted in the hour of their arrival "
        f"by the auditor. Default: {counts.LATE_HORIZON_SECONDS} (7 days).",
    )
    group.add_argument(
        "--max_future_seconds",
        type=int,
        default=counts.MAX_FUTURE_SECONDS,
        help="Events stamped further than this ahead of their arrival are dead-lettered by delivery, and "
        f"counted in the hour of their arrival by the auditor. Default: {counts.MAX_FUTURE_SECONDS}.",
    )


def add_trigger_argument(parser) -> None:
    """What a stream emits before an hour closes; a batch job takes each hour as one pane."""
    parser.add_argument_group("streaming").add_argument(
        "--trigger_seconds",
        type=int,
        default=60,
        help="How often a stream's hours fire: delivery flushes a file per shard of each open hour this "
        "often, and the auditor rewrites a closed hour's counts.json this long after a late message. "
        "Default: 60.",
    )


def add_hour_range_arguments(parser, what: str = "the range", required: bool = False) -> None:
    """``--start`` and ``--end``, the hours a batch job reads. Flags of Beam's options are never
    ``required`` (every options class parses every job's flags): those jobs check them."""
    group = parser.add_argument_group("hour range")
    group.add_argument("--start", required=required, help=f"First hour of {what}, UTC: YYYY-MM-DDTHH (or ISO 8601).")
    group.add_argument("--end", required=required, help="End of the range (exclusive), UTC.")


def help_parser(prog: str, doc: str, *groups) -> argparse.ArgumentParser:
    """A job's ``--help``: its docstring's first line and the groups of flags it uses."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n")[0],
        epilog="Beam's own options (--project, --runner, --region, --temp_location, --setup_file, ...) pass through.",
    )
    for add in groups:
        add(parser)
    return parser


def exit_on_help(argv: list[str], prog: str, doc: str, *groups) -> None:
    """Prints the job's ``--help`` and exits 0 when ``argv`` asks for it. Beam's own parser would
    print a help that lists none of the job's flags."""
    if {"-h", "--help"} & set(argv):
        help_parser(prog, doc, *groups).print_help()
        sys.exit(0)

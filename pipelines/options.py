"""The delivery family's options, parsed once by Beam: the streaming job, the backfill, the redrive.

``PipelineOptions(argv).view_as(DeliveryOptions)`` reads them, so on Dataflow they
travel with the job (its options page shows them, and ``make update`` compares
them). ``delivery_settings`` resolves them, with the type's tier for what is left
unset, into the ``DeliverySettings`` that every transform takes.
"""

from __future__ import annotations

import argparse

from apache_beam.options.pipeline_options import PipelineOptions

from event_delivery.contract import partitions
from event_delivery.contract.fixes import FIXES
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import TIERS, get_event_type, load_registry
from event_delivery.keys.config import add_key_arguments, key_config_from_args
from transforms.settings import DAY_SECONDS, DeliverySettings


class DeliveryOptions(PipelineOptions):
    """Every flag of the delivery family; each job's ``--help`` shows the groups it uses."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_delivery_arguments(parser)
        add_streaming_arguments(parser)
        add_replay_arguments(parser)
        add_redrive_arguments(parser)


def add_delivery_arguments(parser) -> None:
    """What every job of the family needs: the type, where output goes, the hours, the keys."""
    group = parser.add_argument_group("delivery")
    group.add_argument(
        "--event_type", choices=sorted(load_registry()), help="The event type to deliver (one job per type)."
    )
    group.add_argument(
        "--storage_root",
        help="Where output goes, a gs:// URL or a local folder. The output, late and dead-letter "
        "roots default to its delivered/, late/ and dead-letter/ folders.",
    )
    group.add_argument("--output_root", help="Root of delivered hour partitions.")
    group.add_argument("--late_root", help="Root of events that arrived after their hour closed.")
    group.add_argument("--dead_letter_root", help="Root of dead-lettered messages.")
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
        default=7 * DAY_SECONDS,
        help="Events older than this on arrival are dead-lettered (kind bad_timestamp) instead of "
        "delivered late, so the job never holds state for them. Default: 604800 (7 days).",
    )
    group.add_argument(
        "--max_future_seconds",
        type=int,
        default=3600,
        help="Events stamped further than this ahead of their arrival are dead-lettered. Default: 3600.",
    )
    group.add_argument("--num_shards", type=int, help="Files per bucket and pane. Default: the type's tier.")
    group.add_argument(
        "--max_event_bytes", type=int, default=64 * 1024, help="Larger payloads are dead-lettered. Default: 65536."
    )
    group.add_argument(
        "--max_pane_bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="A stream's panes are cut at about this many bytes before they cross a shuffle "
        "(Streaming Engine refuses a commit past ~80 MB and the key then stalls). Default: 16777216.",
    )
    group.add_argument(
        "--target_file_mb",
        type=int,
        default=128,
        help="At close, an hour's pane files are compacted into parts of about this much uncompressed data "
        "(compressed, a part is smaller by the codec's ratio; 0: each pane's file is a part of its own). "
        "Default: 128.",
    )
    group.add_argument(
        "--raw_archive_root",
        help="The raw archive: the streaming job archives every message as it arrived (sealed where "
        f"personal) under it, and a backfill replays from it. Conventionally <storage_root>/{partitions.RAW_ARCHIVE}, "
        f"whose retention is {partitions.RAW_ARCHIVE_RETENTION_DAYS} days (docs/privacy.md). Default: no archive.",
    )
    add_key_arguments(parser)


def add_streaming_arguments(parser) -> None:
    group = parser.add_argument_group("streaming")
    group.add_argument(
        "--subscription",
        help="Full subscription path. Default: projects/<project>/subscriptions/events-<type>-delivery.",
    )
    group.add_argument(
        "--trigger_seconds",
        type=int,
        default=60,
        help="How often open buckets flush a file per shard. Default: 60.",
    )
    group.add_argument(
        "--run_id",
        help="Names this run's files and tells them from earlier runs' staged files. An in-place "
        "update must keep the running job's (make update passes it on). Default: a new one at launch.",
    )


def add_replay_arguments(parser) -> None:
    """The hour range of a batch job of the family (backfill, redrive)."""
    group = parser.add_argument_group("hour range")
    group.add_argument("--start", help="First hour, UTC: YYYY-MM-DDTHH (or ISO 8601).")
    group.add_argument("--end", help="End of the range (exclusive), UTC.")


def add_redrive_arguments(parser) -> None:
    parser.add_argument_group("redrive").add_argument(
        "--fix", default="none", help=f"A registered fix: {', '.join(sorted(FIXES))}. Default: none."
    )


def help_parser(prog: str, doc: str, *groups) -> argparse.ArgumentParser:
    """A job's ``--help``: its docstring's first line and the groups of flags it uses."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n")[0],
        epilog="Beam's own options (--runner, --region, --temp_location, --setup_file, ...) pass through.",
    )
    for add in (add_delivery_arguments, *groups):
        add(parser)
    return parser


def delivery_settings(
    options: DeliveryOptions, bounded: bool = False, archive: bool = True, **overrides
) -> DeliverySettings:
    """The family's settings from its options; raises ``ValueError`` or ``KeyError`` with a one-line reason.

    ``bounded`` settings (a backfill, a redrive) take each hour and shard as one pane.
    Without ``archive`` the job keeps no raw archive (a backfill reads from it instead).
    """
    if not options.event_type:
        raise ValueError("--event_type is required")
    event_type = get_event_type(options.event_type)
    roots = {"delivered": options.output_root, "late": options.late_root, "dead_letter": options.dead_letter_root}
    if options.storage_root:
        under = Layout.under(options.storage_root, event_type.name, options.window_seconds)
        roots = {name: root or getattr(under, name) for name, root in roots.items()}
    if not all(roots.values()):
        raise ValueError("set --storage_root, or all of --output_root, --late_root and --dead_letter_root")
    raw_archive = options.raw_archive_root if archive else None
    layout = Layout(event_type.name, options.window_seconds, **roots, raw_archive=raw_archive)
    tier = event_type.tier
    lateness, shards = options.allowed_lateness_seconds, options.num_shards
    values = dict(
        event_type=event_type,
        layout=layout,
        keys=key_config_from_args(options),
        allowed_lateness_seconds=tier.allowed_lateness_seconds if lateness is None else lateness,
        num_shards=tier.num_shards if shards is None else shards,
        trigger_seconds=None if bounded else options.trigger_seconds,
        late_horizon_seconds=options.late_horizon_seconds,
        max_future_seconds=options.max_future_seconds,
        max_event_bytes=options.max_event_bytes,
        max_pane_bytes=options.max_pane_bytes,
        target_file_mb=options.target_file_mb,
    )
    if options.run_id:
        values["run_id"] = options.run_id
    return DeliverySettings(**{**values, **overrides})

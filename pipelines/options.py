"""The delivery family's options, parsed once by Beam: the streaming job, the backfill, the redrive.

``PipelineOptions(argv).view_as(DeliveryOptions)`` reads the family's own flags and
``view_as(HourOptions)`` those it shares with the auditor (``pipelines.flags``), so on
Dataflow they travel with the job (its options page shows them, and ``make update``
compares them). ``delivery_settings`` resolves them, with the type's tier for what is
left unset, into the ``DeliverySettings`` that every transform takes.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.fixes import FIXES
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import get_event_type
from event_delivery.keys.config import add_key_arguments, key_config_from_args
from pipelines import flags
from pipelines.flags import HourOptions, add_hour_range_arguments
from transforms.records import schema_fingerprint
from transforms.settings import STATE_LAYOUT, DeliverySettings


class DeliveryOptions(PipelineOptions):
    """The delivery family's own flags (the shared ones are ``HourOptions``); each job's
    ``--help`` shows the groups it uses."""

    @classmethod
    def _add_argparse_args(cls, parser):
        add_delivery_arguments(parser)
        add_streaming_arguments(parser)
        add_hour_range_arguments(parser)
        add_redrive_arguments(parser)


def add_delivery_arguments(parser) -> None:
    """What every job of the family needs beside the shared flags: where output goes, the panes, the keys."""
    group = parser.add_argument_group("delivery")
    group.add_argument("--output_root", help="Root of delivered hour partitions.")
    group.add_argument("--late_root", help="Root of events that arrived after their hour closed.")
    group.add_argument("--dead_letter_root", help="Root of dead-lettered messages.")
    group.add_argument("--num_shards", type=int, help="Files per bucket and pane. Default: the type's tier.")
    group.add_argument(
        "--max_event_bytes", type=int, default=64 * 1024, help="Larger payloads are dead-lettered. Default: 65536."
    )
    group.add_argument(
        "--max_pane_bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="A stream's panes are cut at about this many bytes before they cross a shuffle, and fire "
        "once about this many bytes wait (Streaming Engine refuses a value past ~80 MB and a commit "
        "past ~180 MB, and the key then stalls). Default: 16777216.",
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
        "--codec",
        default=files.AVRO_CODEC,
        help=f"The Avro codec of the delivered, late and dead-letter files: {', '.join(files.CODECS)} "
        "(deflate reads anywhere, snappy is the fastest, zstandard the smallest). Each file names its own, so "
        "an update may change it: an hour's parts all have the codec its close started with. "
        f"Default: {files.AVRO_CODEC}.",
    )
    group.add_argument(
        "--raw_archive_root",
        help="The raw archive: the streaming job archives every message as it arrived (sealed where "
        f"personal) under it, and a backfill replays from it. Conventionally <storage_root>/{partitions.RAW_ARCHIVE}, "
        f"whose retention is {partitions.RAW_ARCHIVE_RETENTION_DAYS} days (docs/privacy.md). Default: no archive.",
    )
    add_key_arguments(parser)


def add_streaming_arguments(parser) -> None:
    group = parser.add_argument_group("stream: subscription and run")
    group.add_argument(
        "--subscription",
        help="Full subscription path. Default: projects/<project>/subscriptions/events-<type>-delivery.",
    )
    group.add_argument(
        "--run_id",
        help="Names this run's files and tells them from earlier runs' staged files. An in-place "
        "update must keep the running job's (make update passes it on). Default: a new one at launch.",
    )
    group.add_argument(
        "--state_layout",
        type=int,
        default=STATE_LAYOUT,
        help="The layout of the state this code keeps, recorded for make update, which refuses to hand "
        f"a running job's state to another layout. Default (the only one): {STATE_LAYOUT}.",
    )
    group.add_argument(
        "--schema_fingerprint",
        type=int,
        help="The fingerprint of the type's delivered schema that the events in flight are encoded under, "
        "recorded for make update, which refuses to change it. Default: the type's, as this code has it.",
    )


def add_redrive_arguments(parser) -> None:
    parser.add_argument_group("redrive").add_argument(
        "--fix", default="none", help=f"A registered fix: {', '.join(sorted(FIXES))}. Default: none."
    )


def exit_on_help(argv: list[str], prog: str, doc: str, *groups) -> None:
    """A job of the family's ``--help``: the shared flags, the family's, and ``groups``."""
    flags.exit_on_help(argv, prog, doc, flags.add_hour_arguments, add_delivery_arguments, *groups)


def delivery_settings(
    options: PipelineOptions, bounded: bool = False, archive: bool = True, **overrides
) -> DeliverySettings:
    """The family's settings from its options (any view); raises ``ValueError`` or ``KeyError``
    with a one-line reason.

    ``bounded`` settings (a backfill, a redrive) take each hour and shard as one pane.
    Without ``archive`` the job keeps no raw archive (a backfill reads from it instead).
    """
    shared, options = options.view_as(HourOptions), options.view_as(DeliveryOptions)
    if not shared.event_type:
        raise ValueError("--event_type is required")
    event_type = get_event_type(shared.event_type)
    roots = {"delivered": options.output_root, "late": options.late_root, "dead_letter": options.dead_letter_root}
    if shared.storage_root:
        under = Layout.under(shared.storage_root, event_type.name, shared.window_seconds)
        roots = {name: root or getattr(under, name) for name, root in roots.items()}
    if not all(roots.values()):
        raise ValueError("set --storage_root, or all of --output_root, --late_root and --dead_letter_root")
    raw_archive = options.raw_archive_root if archive else None
    layout = Layout(event_type.name, shared.window_seconds, **roots, raw_archive=raw_archive)
    tier = event_type.tier
    lateness, shards = shared.allowed_lateness_seconds, options.num_shards
    values = dict(
        event_type=event_type,
        layout=layout,
        keys=key_config_from_args(options),
        allowed_lateness_seconds=tier.allowed_lateness_seconds if lateness is None else lateness,
        num_shards=tier.num_shards if shards is None else shards,
        trigger_seconds=None if bounded else shared.trigger_seconds,
        late_horizon_seconds=shared.late_horizon_seconds,
        max_future_seconds=shared.max_future_seconds,
        max_event_bytes=options.max_event_bytes,
        max_pane_bytes=options.max_pane_bytes,
        target_file_mb=options.target_file_mb,
        codec=options.codec,
    )
    if options.run_id:
        values["run_id"] = options.run_id
    if options.state_layout != STATE_LAYOUT:
        raise ValueError(f"--state_layout {options.state_layout}: this code keeps its state in layout {STATE_LAYOUT}")
    fingerprint = schema_fingerprint(event_type)
    if options.schema_fingerprint not in (None, fingerprint):
        raise ValueError(
            f"--schema_fingerprint {options.schema_fingerprint}: this code delivers {event_type.name} "
            f"under the schema of fingerprint {fingerprint}"
        )
    return DeliverySettings(**{**values, **overrides})

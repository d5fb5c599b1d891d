"""The delivery job: one event type's Pub/Sub subscription to hourly, deduplicated Avro.

Each event type runs as its own streaming job, so a broken or flooded type never
stalls another. The whole path is the list of named steps in ``deliver``.

Run one type locally on the DirectRunner (against the emulators, see ``make emulators``)::

    python -m pipelines.delivery --event_type play --project local-project \\
        --storage_root gs://event-delivery-local --window_seconds 60 \\
        --allowed_lateness_seconds 30

and on Dataflow::

    python -m pipelines.delivery --event_type play --project my-project \\
        --storage_root gs://my-bucket --runner DataflowRunner --region europe-west1 \\
        --temp_location gs://my-bucket/tmp --setup_file ./setup.py
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from event_delivery.cloud import preflight
from event_delivery.cloud.clients import lift_emulator_pull_limit, use_emulator_credentials
from event_delivery.contract import partitions
from event_delivery.contract.dead_letters import DEAD_LETTER_SCHEMA
from event_delivery.contract.registry import TIERS, EventType, get_event_type, load_registry
from event_delivery.keys.config import KeyConfig, add_key_arguments, key_config_from_args
from pipelines.runtime import LOCAL_RUNNER, pipeline_options, start_logging
from transforms.archive import ArchiveRawMessages
from transforms.close import CloseHour
from transforms.dedup import Deduplicate
from transforms.hours import BucketByHour
from transforms.parse import RAW_MESSAGES, ParseEvents
from transforms.personal import EncryptPersonalFields, JobKeyCache, QuarantineDeadLetters
from transforms.read import ReadMessages
from transforms.reports import DEAD_LETTERED, DELIVERED, FORGOTTEN, LATE
from transforms.write import WriteAvroPanes, prepared_record

DAY_SECONDS = 24 * 3600


class DeliveryOptions(PipelineOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        group = add_delivery_arguments(parser)
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
            "--raw_archive_root",
            help="Also archive every message as it arrived (sealed where personal) under this root, for "
            "backfills (make backfill). Conventionally <storage_root>/raw. Default: no archive.",
        )


def add_delivery_arguments(parser):
    """The flags the streaming job and the backfill share; returns their group."""
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
    add_key_arguments(parser)
    return group


@dataclasses.dataclass(frozen=True)
class DeliverySettings:
    """Everything the delivery path needs, resolved and checked."""

    event_type: EventType
    output_root: str
    late_root: str
    dead_letter_root: str
    keys: KeyConfig
    window_seconds: int = partitions.HOUR_SECONDS
    allowed_lateness_seconds: int | None = None
    trigger_seconds: int | None = 60  # None: a bounded input, one pane per hour and shard
    late_horizon_seconds: int = 7 * DAY_SECONDS
    max_future_seconds: int = 3600
    num_shards: int | None = None
    max_event_bytes: int = 64 * 1024
    run_id: str = dataclasses.field(default_factory=partitions.new_run_id)
    raw_archive_root: str | None = None
    key_cache: JobKeyCache = dataclasses.field(init=False, repr=False, compare=False)

    @property
    def bounded(self) -> bool:
        """A bounded input (a backfill): each hour and shard comes as one pane."""
        return self.trigger_seconds is None

    @property
    def staging_root(self) -> str:
        """Delivered panes wait here until their hour closes; ``_`` hides it from Hive and Spark."""
        return partitions.join(self.output_root, "_staging")

    def __post_init__(self):
        object.__setattr__(self, "key_cache", JobKeyCache(self.keys))
        tier = self.event_type.tier
        if self.allowed_lateness_seconds is None:
            object.__setattr__(self, "allowed_lateness_seconds", tier.allowed_lateness_seconds)
        if self.num_shards is None:
            object.__setattr__(self, "num_shards", tier.num_shards)
        partitions.check_window_seconds(self.window_seconds)
        for name in ("allowed_lateness_seconds", "late_horizon_seconds", "max_future_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("trigger_seconds", "num_shards", "max_event_bytes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.late_horizon_seconds <= self.window_seconds + self.allowed_lateness_seconds:
            raise ValueError("late_horizon_seconds must exceed window_seconds + allowed_lateness_seconds")

    def bucket(self) -> BucketByHour:
        return BucketByHour(
            self.window_seconds,
            self.allowed_lateness_seconds,
            self.trigger_seconds,
            self.late_horizon_seconds,
            self.num_shards,
        )


def deliver(messages, settings: DeliverySettings):
    """The delivery path from raw messages to closed hours; returns the marker paths."""
    event_type, keys, run = settings.event_type, settings.keys, settings.run_id
    name, schema, window_seconds = event_type.name, event_type.delivered_schema, settings.window_seconds

    archive = settings.raw_archive_root is not None
    parsed = messages | "ParseEvents" >> ParseEvents(
        event_type, settings.max_event_bytes, settings.late_horizon_seconds, settings.max_future_seconds, archive
    )
    if archive:
        parsed[RAW_MESSAGES] | "ArchiveRawMessages" >> ArchiveRawMessages(settings)
    panes = parsed.events | "BucketByHour" >> settings.bucket()
    staging = (settings.staging_root, name, window_seconds, run)
    deduplicated = panes | "Deduplicate" >> Deduplicate(staging, settings.bounded)

    protected = deduplicated.unique | "EncryptPersonalFields" >> EncryptPersonalFields(event_type, settings.key_cache)
    staged = protected["events"] | "StageDelivered" >> WriteAvroPanes(
        settings.staging_root, name, schema, window_seconds, run, DELIVERED
    )
    late_protected = deduplicated.late | "EncryptLateFields" >> EncryptPersonalFields(event_type, settings.key_cache)
    late = late_protected["events"] | "WriteLate" >> WriteAvroPanes(
        settings.late_root, name, schema, window_seconds, run, LATE
    )
    quarantined = parsed.dead_letters | "QuarantineDeadLetters" >> QuarantineDeadLetters(name, keys)
    dead_lettered = (
        quarantined
        | "BucketDeadLetters" >> settings.bucket()
        | "WriteDeadLetters"
        >> WriteAvroPanes(
            settings.dead_letter_root, name, DEAD_LETTER_SCHEMA, window_seconds, run, DEAD_LETTERED, prepared_record
        )
    )

    reports = (staged, deduplicated.duplicates, protected[FORGOTTEN], late, dead_lettered)
    roots = (settings.output_root, settings.late_root, settings.staging_root, settings.dead_letter_root)
    return reports | "HourReports" >> beam.Flatten() | "CloseHour" >> CloseHour(roots, name, window_seconds, run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.delivery",
        description="Deliver one event type from Pub/Sub to hourly, deduplicated Avro partitions.",
        epilog="Beam's own options (--runner, --region, --temp_location, --setup_file, ...) pass through.",
    )
    parser.add_argument("--project", help="GCP project of the subscription (also Beam's --project).")
    DeliveryOptions._add_argparse_args(parser)
    return parser


def settings_from_args(args) -> DeliverySettings:
    """Resolves the parsed flags into settings; raises ``ValueError`` with a one-line reason."""
    if not args.event_type:
        raise ValueError("--event_type is required")
    output_root, late_root, dead_letter_root = args.output_root, args.late_root, args.dead_letter_root
    if args.storage_root:
        root = args.storage_root.rstrip("/")
        output_root = output_root or f"{root}/delivered"
        late_root = late_root or f"{root}/late"
        dead_letter_root = dead_letter_root or f"{root}/dead-letter"
    if not (output_root and late_root and dead_letter_root):
        raise ValueError("set --storage_root, or all of --output_root, --late_root and --dead_letter_root")
    return DeliverySettings(
        event_type=get_event_type(args.event_type),
        output_root=output_root,
        late_root=late_root,
        dead_letter_root=dead_letter_root,
        keys=key_config_from_args(args),
        window_seconds=args.window_seconds,
        allowed_lateness_seconds=args.allowed_lateness_seconds,
        trigger_seconds=args.trigger_seconds,
        late_horizon_seconds=args.late_horizon_seconds,
        max_future_seconds=args.max_future_seconds,
        num_shards=args.num_shards,
        max_event_bytes=args.max_event_bytes,
        raw_archive_root=args.raw_archive_root,
    )


def subscription_path(args, event_type: EventType) -> str:
    if args.subscription:
        return args.subscription
    if not args.project:
        raise ValueError("set --project (or --subscription)")
    return f"projects/{args.project}/subscriptions/{event_type.subscription}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def start(argv: list[str]):
    """Builds and starts the job; returns its result and runner. Flag errors exit with code 2."""
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    try:
        settings = settings_from_args(args)
        subscription = subscription_path(args, settings.event_type)
    except (KeyError, ValueError) as error:
        parser.error(str(error).strip("'\""))
    use_emulator_credentials()
    options = pipeline_options(argv)
    standard = options.view_as(StandardOptions)
    standard.streaming = True
    if standard.runner == LOCAL_RUNNER:
        with preflight.exit_on_failure(parser):
            preflight.check_subscription(subscription)
            roots = (settings.output_root, settings.late_root, settings.dead_letter_root, settings.raw_archive_root)
            for root in set(roots) - {None}:
                preflight.check_root(root, args.project)
        lift_emulator_pull_limit()
    pipeline = beam.Pipeline(options=options)
    deliver(pipeline | "ReadMessages" >> ReadMessages(subscription), settings)
    result = pipeline.run()
    logging.info("delivering %s from %s to %s", settings.event_type.name, subscription, settings.output_root)
    return result, standard.runner


def main(argv=None) -> int:
    start_logging()
    argv = sys.argv[1:] if argv is None else argv
    result, runner = start(argv)
    if runner != LOCAL_RUNNER:
        return 0  # the remote service runs the job from here on
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result.wait_until_finish()
    except KeyboardInterrupt:
        logging.info("stopping the job")
        result.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())

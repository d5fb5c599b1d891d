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

import logging
import signal
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions

from event_delivery.cloud import preflight
from event_delivery.cloud.clients import lift_emulator_pull_limit, use_emulator_credentials
from event_delivery.contract.dead_letters import DEAD_LETTER_SCHEMA
from pipelines.flags import add_trigger_argument
from pipelines.options import DeliveryOptions, add_streaming_arguments, delivery_settings, exit_on_help
from pipelines.runtime import LOCAL_RUNNER, pipeline_options, start_logging
from transforms.archive import ArchiveRawMessages
from transforms.close import AnnounceEveryHour, CloseHour
from transforms.dedup import Deduplicate
from transforms.hours import BucketByHour
from transforms.late import WriteLatePanes
from transforms.leftover_hours import AnnounceLeftoverHours
from transforms.parse import ParseEvents
from transforms.personal import CountForgotten, EncryptPersonalFields
from transforms.read import ReadMessages
from transforms.reports import DEAD_LETTERED, DELIVERED
from transforms.sealed_dead_letters import SealDeadLetters
from transforms.sealing import JobKeyCache
from transforms.settings import DeliverySettings
from transforms.stream_panes import GatherPanes
from transforms.write import WriteAvroPanes, WriteAvroPanesOrGiveUp, prepared_record

PROG = "python -m pipelines.delivery"
READY_LINE = "delivering "  # logged once the job reads its subscription; local runs wait for it


def deliver(messages, settings: DeliverySettings, key_cache: JobKeyCache | None = None):
    """The delivery path from raw messages to closed hours; returns the marker paths.

    One ``key_cache`` serves every step; a source that unseals messages itself (the
    backfill's archive replay) passes its own, so the keys it read are there for the path.
    """
    key_cache = key_cache or JobKeyCache(settings.keys, settings.event_type.name)
    event_type, layout = settings.event_type, settings.layout
    archive = layout.raw_archive is not None

    parsed = messages | "ParseEvents" >> ParseEvents(settings, keep_raw=archive)
    if archive:
        parsed.raw_messages | "ArchiveRawMessages" >> ArchiveRawMessages(settings, key_cache)
    # Sealed where they were read: nothing personal crosses a shuffle in clear. An event whose
    # subject's key is unavailable for good becomes a dead letter: no bundle is retried forever.
    encrypted = parsed.output | "EncryptPersonalFields" >> EncryptPersonalFields(event_type, key_cache)
    # Repeats within a pane go here; across an hour's panes, at its close (transforms/close_repeats.py).
    events = encrypted.output
    if settings.bounded:  # one pane per (hour, shard): the pane decides
        deduplicated = events | "BucketByHour" >> BucketByHour(settings) | "Deduplicate" >> Deduplicate(settings)
    else:
        deduplicated = events | "GatherPanes" >> GatherPanes(settings)

    # A pane whose write fails for good becomes dead letters: no bundle is retried forever.
    staged = deduplicated.unique | "StageDelivered" >> WriteAvroPanesOrGiveUp(
        settings, layout.staging, DELIVERED, key_cache, compress=False, numbered=True
    )
    # Less the ids its closed hour already holds, for the whole late horizon (see transforms/late.py).
    late = deduplicated.late | "WriteLate" >> WriteLatePanes(settings, key_cache)
    forgotten = deduplicated.unique | "CountForgotten" >> CountForgotten(event_type)

    # Every step that can fail gives its failures in one shape, and they all go to one sink.
    dead_lettered = (
        (parsed.dead_letters, encrypted.dead_letters, staged.dead_letters, late.dead_letters)
        | "DeadLetters" >> beam.Flatten()
        | "SealDeadLetters" >> SealDeadLetters(event_type, key_cache)
        | "BucketDeadLetters" >> BucketByHour(settings)
        | "WriteDeadLetters"
        >> WriteAvroPanes(settings, layout.dead_letter, DEAD_LETTERED, DEAD_LETTER_SCHEMA, prepared_record)
    )

    reports = (staged.output, deduplicated.duplicates, forgotten, late.output, dead_lettered)
    if not settings.bounded:  # hours a drained or stopped run left open close with this run's,
        # and every hour from the start on closes, also when nothing arrives in it
        reports += (
            messages.pipeline | "AnnounceLeftoverHours" >> AnnounceLeftoverHours(settings),
            messages | "AnnounceEveryHour" >> AnnounceEveryHour(settings),
        )
    return reports | "HourReports" >> beam.Flatten() | "CloseHour" >> CloseHour(settings)


def subscription_path(options: PipelineOptions, settings: DeliverySettings) -> str:
    subscription = options.view_as(DeliveryOptions).subscription
    if subscription:
        return subscription
    project = options.view_as(GoogleCloudOptions).project
    if not project:
        raise ValueError("set --project (or --subscription)")
    return f"projects/{project}/subscriptions/{settings.event_type.subscription}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def start(argv: list[str]):
    """Builds and starts the job; returns its result and runner. Flag errors exit with code 2."""
    exit_on_help(argv, PROG, __doc__, add_trigger_argument, add_streaming_arguments)
    options = pipeline_options(argv)
    try:
        settings = delivery_settings(options)
        subscription = subscription_path(options, settings)
    except (KeyError, ValueError) as error:
        preflight.fail(PROG, str(error).strip("'\""))
    use_emulator_credentials()
    standard = options.view_as(StandardOptions)
    standard.streaming = True
    if standard.runner == LOCAL_RUNNER:
        with preflight.exit_on_failure(PROG):
            preflight.check_subscription(subscription)
            layout = settings.layout
            for root in {layout.delivered, layout.late, layout.dead_letter, layout.raw_archive} - {None}:
                preflight.check_root(root, options.view_as(GoogleCloudOptions).project)
            settings.keys.preflight()
        lift_emulator_pull_limit()
    pipeline = beam.Pipeline(options=options)
    deliver(pipeline | "ReadMessages" >> ReadMessages(subscription), settings)
    result = pipeline.run()
    logging.info("%s%s from %s to %s", READY_LINE, settings.event_type.name, subscription, settings.layout.delivered)
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

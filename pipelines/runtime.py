"""What the jobs share as they start: the runner, logging, and the hour ranges of batch jobs."""

from __future__ import annotations

import datetime
import logging
import posixpath

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from event_delivery.cloud import files, preflight
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions

# Beam's "DirectRunner" first tries Prism, which it downloads from the internet; the
# Python DirectRunner needs nothing and is what CI runs. For a batch job it would pick the
# FnApiRunner, which is faster and can use several worker processes.
LOCAL_RUNNER = "BundleBasedDirectRunner"
LOCAL_BATCH_RUNNER = "FnApiRunner"


def pipeline_options(beam_args: list[str], local_runner: str = LOCAL_RUNNER) -> PipelineOptions:
    """Beam's own flags, on ``local_runner`` unless ``--runner`` names another."""
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    if standard.runner in (None, "DirectRunner"):
        standard.runner = local_runner
    return options


def start_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def start_batch_job(parser, argv: list[str], resolve, source: str):
    """Parses a batch job's flags: its hour range, and what ``resolve(args)`` makes of the rest.

    A bad value, or a ``source`` flag naming a root that is not there (or not
    reachable), exits with one line and code 2. Then logging starts and, against the
    emulators, their credentials are in place. Returns ``(args, beam_args, (start, end), resolved)``.
    """
    args, beam_args = parser.parse_known_args(argv)
    try:
        hours = utc_hour(args.start), utc_hour(args.end)
        resolved = resolve(args)
    except (KeyError, ValueError) as error:
        parser.error(error.args[0] if isinstance(error, KeyError) else str(error))
    with preflight.exit_on_failure(parser.prog):
        preflight.check_root(getattr(args, source), create=False)
    start_logging()
    use_emulator_credentials()
    return args, beam_args, hours, resolved


def start_replay_job(prog: str, doc: str, argv: list[str], settings_of, source_of, runner: str, *groups):
    """Parses a batch job of the delivery family (backfill, redrive) once, with Beam.

    ``settings_of(options)`` resolves its settings and ``source_of(options, settings)`` names the
    root it reads, which must be there. ``--help`` shows the family's flags and ``groups``.
    A bad value or a failed check exits with one line and code 2. Then logging starts and,
    against the emulators, their credentials are in place.
    Returns ``(options, settings, (start, end), source)``.
    """
    from pipelines.flags import add_hour_range_arguments
    from pipelines.options import DeliveryOptions, exit_on_help

    exit_on_help(argv, prog, doc, add_hour_range_arguments, *groups)
    options = pipeline_options(argv, runner)
    family = options.view_as(DeliveryOptions)
    try:
        if not (family.start and family.end):
            raise ValueError("--start and --end are required")
        hours = utc_hour(family.start), utc_hour(family.end)
        settings = settings_of(family)
        source = source_of(family, settings)
    except (KeyError, ValueError) as error:
        preflight.fail(prog, error.args[0] if isinstance(error, KeyError) else str(error))
    with preflight.exit_on_failure(prog):
        preflight.check_root(source, create=False)
        settings.keys.preflight()
    start_logging()
    use_emulator_credentials()
    return options, settings, hours, source


def utc_hour(text: str) -> datetime.datetime:
    """``YYYY-MM-DDTHH`` or any ISO 8601 time; UTC unless it says otherwise."""
    try:
        moment = datetime.datetime.fromisoformat(text if len(text) > 13 else f"{text}:00")
    except ValueError:
        raise ValueError(f"{text!r} is not an hour: use YYYY-MM-DDTHH (UTC) or ISO 8601") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.timezone.utc)


def partition_paths(
    root: str, event_type: str, start: datetime.datetime, end: datetime.datetime, pattern: str = "*.avro"
) -> list[str]:
    """Files (Avro, unless ``pattern`` says otherwise) under ``root`` of the hours that start in ``[start, end)``."""
    start_millis, end_millis = start.timestamp() * 1000, end.timestamp() * 1000
    selected = []
    for path in files.glob(partitions.join(root, event_type, "dt=*", "hr=*", pattern)):
        partition = "/".join(posixpath.dirname(path).split("/")[-2:])
        if start_millis <= partitions.partition_bounds(partition, 1)[0] < end_millis:
            selected.append(path)
    return selected

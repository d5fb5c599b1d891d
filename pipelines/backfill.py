"""The backfill job: re-deliver a type's hour range from its raw archive.

It replays the archived messages of the hours in ``[--start, --end)`` through the
streaming job's own delivery path (``pipelines.delivery.deliver``): the same parsing,
bucketing, deduplication, encryption, writing and closing. Only the source (archive
files instead of a subscription) and the sink (a storage root of its own) differ.

A backfill is idempotent: it first empties the hours it is about to write under
``--storage_root``, and its file names are fixed, so running it again on the same
archive gives the same records, the same files and the same manifests. Messages whose
subject was forgotten since they were archived cannot be read back; they are counted
as erased::

    python -m pipelines.backfill --event_type play --raw_archive_root gs://bucket/raw \\
        --storage_root gs://bucket/backfill --start 2026-11-29T00 --end 2026-11-29T06
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from event_delivery.cloud import files
from event_delivery.contract import partitions
from pipelines.delivery import DeliverySettings, add_delivery_arguments, deliver, settings_from_args
from pipelines.runtime import (
    LOCAL_BATCH_RUNNER,
    add_hour_range_arguments,
    partition_paths,
    pipeline_options,
    start_batch_job,
)
from transforms.archive import ERASED, ReplayArchiveFn

RUN_ID = "backfill"


class Backfill(beam.PTransform):
    """Archive files in; the delivery path's markers out."""

    def __init__(self, archive_paths: list[str], settings: DeliverySettings):
        super().__init__()
        self.archive_paths = archive_paths
        self.settings = settings

    def expand(self, pipeline):
        messages = (
            pipeline
            | "ListArchiveFiles" >> beam.Create(self.archive_paths)  # it spreads the files over workers
            | "ReplayArchive" >> beam.ParDo(ReplayArchiveFn(self.settings.event_type, self.settings.key_cache))
        )
        return deliver(messages, self.settings)


def clear_hours(settings: DeliverySettings, start, end) -> int:
    """Deletes what an earlier backfill wrote to the hours of the range; returns how many files."""
    name = settings.event_type.name
    roots = (settings.output_root, settings.staging_root, settings.late_root, settings.dead_letter_root)
    stale = [path for root in roots for path in partition_paths(root, name, start, end, pattern="*")]
    if stale:
        FileSystems.delete(stale)
    return len(stale)


def _settings(args) -> DeliverySettings:
    """The delivery path's settings for a bounded replay: no archive of its own, fixed file names."""
    return dataclasses.replace(settings_from_args(args), raw_archive_root=None, run_id=RUN_ID)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.backfill",
        description=__doc__.split("\n")[0],
        epilog="Beam's own options (--runner, --direct_num_workers, ...) pass through.",
    )
    parser.add_argument(
        "--raw_archive_root", required=True, help="The delivery job's --raw_archive_root, e.g. gs://bucket/raw."
    )
    add_hour_range_arguments(parser, "the backfill")
    add_delivery_arguments(parser)
    parser.set_defaults(trigger_seconds=None)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, beam_args, (start, end), settings = start_batch_job(parser, argv, _settings, "raw_archive_root")
    source = args.raw_archive_root
    name = settings.event_type.name
    paths = partition_paths(source, name, start, end)
    cleared = clear_hours(settings, start, end)
    if not paths:
        print(f"no archived {name} messages in {source} for {start:%Y-%m-%dT%H}..{end:%Y-%m-%dT%H}")
        return 0
    pipeline = beam.Pipeline(options=pipeline_options(beam_args, LOCAL_BATCH_RUNNER))
    pipeline | f"Backfill {name}" >> Backfill(paths, settings)
    result = pipeline.run()
    result.wait_until_finish()
    counts = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
    accounting = collections.Counter()
    for marker in partition_paths(settings.output_root, name, start, end, pattern=partitions.SUCCESS_MARKER):
        accounting.update(files.read_json(marker)["accounting"])
    print(
        f"{name}: replayed {counts.get('replayed', 0)} archived message(s) from {len(paths)} file(s) into "
        f"{settings.output_root} ({cleared} file(s) of an earlier backfill replaced): {accounting['delivered']} "
        f"delivered, {accounting['duplicates']} duplicates, {accounting['dead_lettered']} dead-lettered; "
        f"{counts.get(ERASED, 0)} erased (subject forgotten)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The backfill job: re-deliver a type's hour range from its raw archive.

It replays the archived messages of the hours in ``[--start, --end)`` through the
streaming job's own delivery path (``pipelines.delivery.deliver``): the same parsing,
bucketing, deduplication, encryption, writing and closing. Only the source (archive
files instead of a subscription) and the sink (a storage root of its own) differ.

A backfill is idempotent: it first empties the hours it is about to write under
``--storage_root``, and its file names are fixed, so running it again on the same
archive gives the same records, the same files and the same manifests. Messages whose
subject was forgotten since they were archived cannot be read back; they are counted
as erased. Messages whose seal does not open are counted as unreadable::

    python -m pipelines.backfill --event_type play --raw_archive_root gs://bucket/raw \\
        --storage_root gs://bucket/backfill --start 2026-11-29T00 --end 2026-11-29T06
"""

from __future__ import annotations

import collections
import sys

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from event_delivery.cloud import files
from event_delivery.contract import partitions
from pipelines.delivery import deliver
from pipelines.options import DeliveryOptions, delivery_settings
from pipelines.runtime import LOCAL_BATCH_RUNNER, partition_paths, start_replay_job
from transforms.archive import ERASED, UNREADABLE, ReplayArchiveFn
from transforms.sealing import JobKeyCache
from transforms.settings import DeliverySettings

PROG = "python -m pipelines.backfill"
RUN_ID = "backfill"


class Backfill(beam.PTransform):
    """Archive files in; the delivery path's markers out."""

    def __init__(self, archive_paths: list[str], settings: DeliverySettings):
        super().__init__()
        self.archive_paths = archive_paths
        self.settings = settings

    def expand(self, pipeline):
        # The replay unseals with the keys the path then encrypts with: one cache serves both.
        key_cache = JobKeyCache(self.settings.keys, self.settings.event_type.name)
        messages = (
            pipeline
            | "ListArchiveFiles" >> beam.Create(self.archive_paths)  # it spreads the files over workers
            | "ReplayArchive" >> beam.ParDo(ReplayArchiveFn(self.settings.event_type, key_cache))
        )
        return deliver(messages, self.settings, key_cache)


def clear_hours(settings: DeliverySettings, start, end) -> int:
    """Deletes what an earlier backfill wrote to the hours of the range; returns how many files."""
    layout = settings.layout
    roots = (layout.delivered, layout.staging, layout.late, layout.dead_letter)
    stale = [path for root in roots for path in partition_paths(root, layout.event_type, start, end, pattern="*")]
    if stale:
        FileSystems.delete(stale)
    return len(stale)


def _settings(options: DeliveryOptions) -> DeliverySettings:
    """The delivery path's settings for a bounded replay: no archive of its own, fixed file names."""
    if not options.raw_archive_root:
        raise ValueError("--raw_archive_root is required: the archive to replay")
    return delivery_settings(options, bounded=True, archive=False, run_id=RUN_ID)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options, settings, (start, end), source = start_replay_job(
        PROG, __doc__, argv, _settings, lambda family, _: family.raw_archive_root, LOCAL_BATCH_RUNNER
    )
    name = settings.event_type.name
    paths = partition_paths(source, name, start, end)
    cleared = clear_hours(settings, start, end)
    if not paths:
        print(f"no archived {name} messages in {source} for {start:%Y-%m-%dT%H}..{end:%Y-%m-%dT%H}")
        return 0
    pipeline = beam.Pipeline(options=options)
    pipeline | f"Backfill {name}" >> Backfill(paths, settings)
    result = pipeline.run()
    result.wait_until_finish()
    counts = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]}
    accounting = collections.Counter()
    for marker in partition_paths(settings.layout.delivered, name, start, end, pattern=partitions.SUCCESS_MARKER):
        accounting.update(files.read_json(marker)["accounting"])
    print(
        f"{name}: replayed {counts.get('replayed', 0)} archived message(s) from {len(paths)} file(s) into "
        f"{settings.layout.delivered} ({cleared} file(s) of an earlier backfill replaced): {accounting['delivered']} "
        f"delivered, {accounting['duplicates']} duplicates, {accounting['dead_lettered']} dead-lettered; "
        f"{counts.get(ERASED, 0)} erased (subject forgotten), "
        f"{counts.get(UNREADABLE, 0)} unreadable (altered, or sealed in an older format)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

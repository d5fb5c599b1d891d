"""The redrive job: replay a type's fixed dead letters through the normal delivery path.

It reads the dead letters of an hour range, unseals each payload with the type's
quarantine key, applies a registered fix (``event_delivery/contract/fixes.py``; ``none`` after a
schema update), and parses it again with the current schema. What now passes is
bucketed and encrypted by the delivery path's own transforms, and written to the late
root if its hour has closed, or staged for the streaming job to publish when the hour
closes (a close publishes the staged files of every run). The rest stays dead-lettered:
each dead-letter file is rewritten without the messages that left it, so every message is
still in exactly one place::

    python -m pipelines.redrive --event_type search --storage_root gs://bucket \\
        --start 2026-11-29T00 --end 2026-11-29T06 --fix strip_unknown_fields
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import apache_beam as beam
import fastavro
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.transforms.window import GlobalWindows

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions
from event_delivery.contract.dead_letters import DEAD_LETTER_SCHEMA, quarantine_key_name
from event_delivery.contract.fixes import FIXES
from event_delivery.contract.registry import EventType, get_event_type, load_registry
from event_delivery.keys.config import KeyConfig, add_key_arguments, key_config_from_args
from event_delivery.keys.fields import decrypt_bytes
from pipelines.runtime import add_hour_range_arguments, partition_paths, pipeline_options, start_batch_job
from transforms.hours import BucketByHour, bucket_start_seconds
from transforms.parse import DEAD_LETTERS, ParseEventFn
from transforms.personal import EncryptPersonalFields, JobKeyCache
from transforms.reports import DELIVERED, LATE
from transforms.write import WriteAvroPanes

REDRIVEN = "redriven"
SOURCE = "redrive_source"  # attribute carrying the dead letter's place while it is replayed


class ReplayDeadLettersFn(beam.DoFn):
    """A dead-letter file in; each of its messages, unsealed and fixed, out as a Pub/Sub message."""

    def __init__(self, event_type: EventType, keys: KeyConfig, fix_name: str):
        self.event_type = event_type
        self.keys = keys
        self.fix_name = fix_name

    def setup(self):
        use_emulator_credentials()
        self.key = self.keys.open().named_key(quarantine_key_name(self.event_type.name))
        self.fix = FIXES[self.fix_name]

    def process(self, path: str):
        for index, record in enumerate(files.read_avro(path)):
            payload = decrypt_bytes(self.key.aead, record["payload"], self.event_type.name, "payload", self.key.key_id)
            data, attributes = self.fix(payload, dict(record["attributes"]), self.event_type)
            attributes[SOURCE] = f"{index}:{path}"
            yield PubsubMessage(data, attributes, publish_time=record["received_at"])


class ReparseFn(beam.DoFn):
    """Parses a replayed message with the current schema; reports where each one ends up."""

    def __init__(self, event_type: EventType, late_horizon_seconds: int):
        self.parse = ParseEventFn(event_type, 64 * 1024, late_horizon_seconds, 3600)

    def setup(self):
        self.parse.setup()

    def process(self, message):
        attributes = dict(message.attributes)
        source = attributes.pop(SOURCE)
        for output in self.parse.process(PubsubMessage(message.data, attributes, publish_time=message.publish_time)):
            if getattr(output, "tag", None) == DEAD_LETTERS:
                return  # still broken: it stays where it is
            yield output
            yield beam.pvalue.TaggedOutput(REDRIVEN, source)


class RouteByCloseFn(beam.DoFn):
    """Panes of a closed hour go to the late root; those of an hour still open, to staging."""

    def __init__(self, output_root: str, event_type_name: str, window_seconds: int, lateness_seconds: int):
        self.output_root = output_root
        self.event_type_name = event_type_name
        self.window_seconds = window_seconds
        self.lateness_seconds = lateness_seconds

    def setup(self):
        use_emulator_credentials()

    def process(self, pane, window=beam.DoFn.WindowParam):
        start = bucket_start_seconds(window)
        folder = partitions.partition_dir(self.output_root, self.event_type_name, start, self.window_seconds)
        marked = files.exists(partitions.join(folder, partitions.SUCCESS_MARKER))
        over = time.time() > start + self.window_seconds + self.lateness_seconds
        if marked or over:
            yield beam.pvalue.TaggedOutput(LATE, pane)
        else:
            yield pane


class RemoveRedrivenFn(beam.DoFn):
    """Rewrites a dead-letter file without the messages that were redriven from it."""

    def setup(self):
        use_emulator_credentials()
        self.schema = fastavro.parse_schema(DEAD_LETTER_SCHEMA)

    def process(self, path_indices, written):
        path, indices = path_indices
        indices = set(indices)
        remaining = [r for i, r in enumerate(files.read_avro(path)) if i not in indices]
        if remaining:
            files.write_avro(path, self.schema, remaining)
        else:
            FileSystems.delete([path])
        yield len(indices)


def _source_place(source: str) -> tuple[str, int]:
    index, path = source.split(":", 1)
    return path, int(index)


def redrive(pipeline, paths, event_type: EventType, keys: KeyConfig, roots, layout, fix: str, run_id: str):
    """Replays the dead letters in ``paths``; returns how many left each rewritten file."""
    output_root, late_root, staging_root = roots
    window_seconds, lateness_seconds = layout
    name, schema, shards = event_type.name, event_type.delivered_schema, event_type.tier.num_shards
    horizon = 10 * 365 * 24 * 3600  # a redrive may replay old hours on purpose
    replayed = (
        pipeline
        | "ListFiles" >> beam.Create(paths)
        | "ReplayDeadLetters" >> beam.ParDo(ReplayDeadLettersFn(event_type, keys, fix))
        | "ParseEvents" >> beam.ParDo(ReparseFn(event_type, horizon)).with_outputs(REDRIVEN, main="events")
    )
    panes = replayed.events | "BucketByHour" >> BucketByHour(window_seconds, lateness_seconds, None, horizon, shards)
    # No deduplication: every dead letter replays once, and each must land somewhere to be counted.
    protected = panes | "EncryptPersonalFields" >> EncryptPersonalFields(event_type, JobKeyCache(keys))
    route = RouteByCloseFn(output_root, name, window_seconds, lateness_seconds)
    routed = protected["events"] | "RouteByClose" >> beam.ParDo(route).with_outputs(LATE, main="open")
    written = (
        (
            routed.open
            | "StageForClose" >> WriteAvroPanes(staging_root, name, schema, window_seconds, run_id, DELIVERED),
            routed[LATE] | "WriteLate" >> WriteAvroPanes(late_root, name, schema, window_seconds, run_id, LATE),
        )
        | "Written" >> beam.Flatten()
        | "OneWindow" >> beam.WindowInto(GlobalWindows())
    )
    # The side input makes every rewrite wait until all redriven events are written.
    return (
        replayed[REDRIVEN]
        | "ByFile" >> beam.Map(_source_place)
        | "GroupByFile" >> beam.GroupByKey()
        | "RemoveRedriven" >> beam.ParDo(RemoveRedrivenFn(), written=beam.pvalue.AsList(written))
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m pipelines.redrive", description=__doc__.split("\n")[0])
    parser.add_argument("--event_type", required=True, choices=sorted(load_registry()))
    parser.add_argument("--storage_root", required=True, help="The delivery job's --storage_root.")
    add_hour_range_arguments(parser, "dead letters")
    parser.add_argument("--fix", default="none", choices=sorted(FIXES), help="A registered fix. Default: none.")
    parser.add_argument(
        "--window_seconds", type=int, default=partitions.HOUR_SECONDS, help="The delivery job's bucket length."
    )
    parser.add_argument("--allowed_lateness_seconds", type=int, help="The delivery job's lateness. Default: tier's.")
    add_key_arguments(parser)
    args, beam_args, (start, end), keys = start_batch_job(parser, argv, key_config_from_args, "storage_root")
    event_type = get_event_type(args.event_type)
    root = args.storage_root.rstrip("/")
    paths = partition_paths(f"{root}/dead-letter", event_type.name, start, end)
    counts = {path: files.count_avro_records(path) for path in paths}
    before = sum(counts.values())
    # Named after what it replays: a re-run after a failure rewrites the same files, while a
    # redrive of what an earlier one left behind (other contents) never overwrites its files.
    replayed = "\n".join(f"{path} {count}" for path, count in counts.items()) + f"\n{args.fix}"
    run_id = "redrive-" + hashlib.sha256(replayed.encode()).hexdigest()[:12]
    lateness = args.allowed_lateness_seconds
    layout = (args.window_seconds, event_type.tier.allowed_lateness_seconds if lateness is None else lateness)
    roots = (f"{root}/delivered", f"{root}/late", f"{root}/delivered/_staging")
    with beam.Pipeline(options=pipeline_options(beam_args)) as pipeline:
        redrive(pipeline, paths, event_type, keys, roots, layout, args.fix, run_id)
    remaining = sum(
        files.count_avro_records(p) for p in partition_paths(f"{root}/dead-letter", event_type.name, start, end)
    )
    print(f"{event_type.name}: {before} dead letter(s) in range; {before - remaining} redriven, {remaining} remain")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The redrive job: replay a type's fixed dead letters through the normal delivery path.

It reads the dead letters of an hour range, unseals each payload with the key that
sealed it (its subject's, or the type's quarantine key), restores the producer's
attributes sealed with it, applies a registered fix
(``event_delivery/contract/fixes.py``; ``none`` after a schema update), and parses it
again with the current schema. What now passes goes through the delivery path's own
transforms (parse, bucket, encrypt, stage) and to ``CloseHour``, which alone knows
whether an hour is closed: a staged file of an hour that has its marker moves to the
late root; otherwise it waits for the close of the streaming job that owns the hour (a
close publishes the staged files of every run). The rest stays dead-lettered, and so does
an event whose subject's key is still unavailable (a ``key_unavailable`` dead letter stays
one until its key is mended), and a dead letter that cannot be unsealed or that the fix
cannot handle (counted, ``not_replayable``): each dead-letter file is rewritten without the messages
that left it, so every message is still in exactly one place::

    python -m pipelines.redrive --event_type search --storage_root gs://bucket \\
        --start 2026-11-29T00 --end 2026-11-29T06 --fix strip_unknown_fields
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys

import apache_beam as beam
import fastavro
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.transforms.window import GlobalWindows
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import envelope
from event_delivery.contract.dead_letters import DEAD_LETTER_SCHEMA
from event_delivery.contract.fixes import FIXES
from event_delivery.contract.registry import EventType
from event_delivery.keys.config import KeyConfig
from event_delivery.keys.fields import decrypt_bytes
from pipelines.options import DeliveryOptions, add_redrive_arguments, delivery_settings
from pipelines.runtime import LOCAL_RUNNER, partition_paths, start_replay_job
from transforms.close import CloseHour
from transforms.hours import BucketByHour
from transforms.parse import ParseEvents
from transforms.personal import EncryptPersonalFields
from transforms.reports import DELIVERED
from transforms.sealing import JobKeyCache, open_attributes
from transforms.settings import DeliverySettings
from transforms.write import WriteAvroPanes

PROG = "python -m pipelines.redrive"
REPLAYED = "replayed"
NOT_REPLAYABLE = "not_replayable"  # dead letters that stay because their unsealing or the fix failed
SOURCE = "redrive_source"  # attribute carrying the dead letter's place while it is replayed
# A redrive may replay old hours on purpose: nothing it reads is too old.
HORIZON_SECONDS = 10 * 365 * 24 * 3600
_LOG = logging.getLogger(__name__)


class ReplayDeadLettersFn(beam.DoFn):
    """A dead-letter file in; each of its messages, unsealed and fixed, out as a Pub/Sub message,
    and ``(event_id, place)`` of each (``index:path``) on the ``replayed`` output.

    A dead letter that cannot be unsealed, or that the fix cannot handle (whatever either
    raises: a payload nested too deeply to decode, a record altered at rest, a payload moved
    from another record or sealed before payloads were bound to their event id), is not replayed:
    it stays in its file, counted as ``not_replayable``, and the others are replayed. One such
    message would otherwise fail the file's bundle every time, and the job with it.
    """

    def __init__(self, event_type: EventType, keys: KeyConfig, fix_name: str):
        self.event_type = event_type
        self.keys = keys
        self.fix_name = fix_name

    def setup(self):
        use_emulator_credentials()
        self.keystore = self.keys.open()
        self.fix = FIXES[self.fix_name]
        self.erased = beam.metrics.Metrics.counter("redrive", "erased")
        self.not_replayable = beam.metrics.Metrics.counter("redrive", NOT_REPLAYABLE)

    def process(self, path: str):
        records = files.read_avro(path)
        keys = self.keystore.data_keys(r["quarantine_key_id"] for r in records if r["quarantine_key_id"])
        for index, record in enumerate(records):
            key = keys.get(record["quarantine_key_id"])
            if key is None or record["payload"] is None:
                self.erased.inc()  # its subject was forgotten: it cannot be read, and it stays as it is
                continue
            try:
                data, attributes = self.unsealed_and_fixed(record, key)
            except Exception as error:  # anything: a dead letter is what the path could not handle
                self.not_replayable.inc()
                _LOG.warning("dead letter %d of %s stays: %s", index, path, type(error).__name__)  # no value
                continue
            attributes[SOURCE] = f"{index}:{path}"
            yield PubsubMessage(data, attributes, publish_time=record["received_at"])
            yield beam.pvalue.TaggedOutput(REPLAYED, (attributes.get(envelope.EVENT_ID) or None, attributes[SOURCE]))

    def unsealed_and_fixed(self, record: dict, key: bytes) -> tuple[bytes, dict]:
        """The dead letter's ``(data, attributes)`` as it arrived, then fixed."""
        aead, name, key_id = AESGCM(key), self.event_type.name, record["quarantine_key_id"]
        payload = decrypt_bytes(aead, record["payload"], name, envelope.SEALED_PAYLOAD, key_id, record["event_id"])
        attributes = open_attributes(aead, record, name, key_id)
        return self.fix(payload, attributes, self.event_type)


class RemoveRedrivenFn(beam.DoFn):
    """Rewrites a dead-letter file without the messages that were redriven from it, with the job's codec."""

    def __init__(self, codec: str):
        self.codec = codec

    def setup(self):
        use_emulator_credentials()
        self.schema = fastavro.parse_schema(DEAD_LETTER_SCHEMA)

    def process(self, path_indices, written):
        path, indices = path_indices
        indices = set(indices)
        remaining = [r for i, r in enumerate(files.read_avro(path)) if i not in indices]
        if remaining:
            files.write_avro(path, self.schema, remaining, self.codec)
        else:
            FileSystems.delete([path])
        yield len(indices)


def _source_place(source: str) -> tuple[str, int]:
    index, path = source.split(":", 1)
    return path, int(index)


def _places_of_unavailable(id_outcomes) -> list[tuple[str, int]]:
    """The places replayed under an event id that came back ``key_unavailable``. Keys are per
    subject, so every copy of the event is; an id two subjects share keeps both in place, which
    may deliver one twice but never loses one."""
    _, outcomes = id_outcomes
    return [(place, 1) for place in outcomes["replayed"]] if outcomes["key_unavailable"] else []


def _passed(source_outcomes) -> list[str]:
    source, outcomes = source_outcomes
    return [] if outcomes["still_broken"] else [source]


def redrive(pipeline, paths: list[str], settings: DeliverySettings, fix: str):
    """Replays the dead letters in ``paths``; returns how many left each rewritten file."""
    replayed = (
        pipeline
        | "ListFiles" >> beam.Create(paths)
        | "ReplayDeadLetters"
        >> beam.ParDo(ReplayDeadLettersFn(settings.event_type, settings.keys, fix)).with_outputs(
            REPLAYED, main="messages"
        )
    )
    parsed = replayed.messages | "ParseEvents" >> ParseEvents(settings)
    key_cache = JobKeyCache(settings.keys, settings.event_type.name)
    encrypted = parsed.output | "EncryptPersonalFields" >> EncryptPersonalFields(settings.event_type, key_cache)
    # No deduplication: every dead letter replays once, and each must land somewhere to be counted.
    panes = encrypted.output | "BucketByHour" >> BucketByHour(settings)
    staged = panes | "StageDelivered" >> WriteAvroPanes(settings, settings.layout.staging, DELIVERED, compress=False)
    staged | "CloseHour" >> CloseHour(settings, publish=False)

    # What came out of parsing as a dead letter again stays where it is, and so does an event
    # whose subject's key is still unavailable; the rest left its file.
    rejected = parsed.dead_letters | "StillBroken" >> beam.Map(lambda dead: (dead[2]["attributes"][SOURCE], 1))
    key_unavailable = (
        {
            "replayed": replayed[REPLAYED],
            "key_unavailable": encrypted.dead_letters | "UnavailableIds" >> beam.Map(lambda dead: (dead[0], 1)),
        }
        | "JoinIds" >> beam.CoGroupByKey()
        | "KeyStillUnavailable" >> beam.FlatMap(_places_of_unavailable)
    )
    still_broken = (rejected, key_unavailable) | "StillBrokenOrUnavailable" >> beam.Flatten()
    places = replayed[REPLAYED] | "Places" >> beam.Map(lambda id_place: (id_place[1], 1))
    written = staged | "OneWindow" >> beam.WindowInto(GlobalWindows())
    # The side input makes every rewrite wait until all redriven events are written.
    return (
        {"replayed": places, "still_broken": still_broken}
        | "JoinOutcomes" >> beam.CoGroupByKey()
        | "Redriven" >> beam.FlatMap(_passed)
        | "ByFile" >> beam.Map(_source_place)
        | "GroupByFile" >> beam.GroupByKey()
        | "RemoveRedriven" >> beam.ParDo(RemoveRedrivenFn(settings.codec), written=beam.pvalue.AsList(written))
    )


def _settings(options: DeliveryOptions) -> DeliverySettings:
    if options.fix not in FIXES:
        raise ValueError(f"--fix must be one of {', '.join(sorted(FIXES))}")
    return delivery_settings(options, bounded=True, archive=False, late_horizon_seconds=HORIZON_SECONDS)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options, settings, (start, end), dead_letters = start_replay_job(
        PROG, __doc__, argv, _settings, lambda _, s: s.layout.dead_letter, LOCAL_RUNNER, add_redrive_arguments
    )
    fix, name = options.view_as(DeliveryOptions).fix, settings.event_type.name
    paths = partition_paths(dead_letters, name, start, end)
    counts = {path: files.count_avro_records(path) for path in paths}
    before = sum(counts.values())
    # Named after what it replays: a re-run after a failure rewrites the same files, while a
    # redrive of what an earlier one left behind (other contents) never overwrites its files.
    replayed = "\n".join(f"{path} {count}" for path, count in counts.items()) + f"\n{fix}"
    settings = dataclasses.replace(settings, run_id="redrive-" + hashlib.sha256(replayed.encode()).hexdigest()[:12])
    with beam.Pipeline(options=options) as pipeline:
        redrive(pipeline, paths, settings, fix)
    remaining = sum(files.count_avro_records(p) for p in partition_paths(dead_letters, name, start, end))
    print(f"{name}: {before} dead letter(s) in range; {before - remaining} redriven, {remaining} remain")
    return 0


if __name__ == "__main__":
    sys.exit(main())

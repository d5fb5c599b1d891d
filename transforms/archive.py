"""The raw archive: every message a delivery job read, as it arrived, for backfills.

Each message is kept whole (payload, attributes, arrival time) in the hour it is
accounted in, duplicates and malformed ones included, so a backfill that replays an
hour through the delivery path reproduces that hour's accounting. A payload that
may hold personal data is sealed: a valid event's under its subject's key, so that
forgetting the subject erases it here too; any other (a malformed message, even one that
names a subject: a key made for every string such a message names would grow the keystore
without bound), and a valid event's whose subject's key is unavailable (see
``transforms.personal``), under the type's quarantine key. The producer's attributes
other than the envelope's are sealed with the payload, under the same key. Types without
personal fields are archived in clear, unless the producer added attributes of its own,
which nothing checks: such a message is sealed whole under the quarantine key, like one
that names no subject. The archive is kept ``partitions.RAW_ARCHIVE_RETENTION_DAYS``.
"""

from __future__ import annotations

import functools

import apache_beam as beam
import fastavro
from apache_beam.io.gcp.pubsub import PubsubMessage

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import envelope, slo
from event_delivery.contract.registry import EventType
from event_delivery.keys.fields import UndecryptableField, decrypt_bytes, encrypt_bytes
from transforms.hours import BucketByHour
from transforms.reports import ARCHIVED
from transforms.sealing import JobKeyCache, SealInBatchesFn, open_attributes, seal_attributes
from transforms.write import WriteAvroPanes, prepared_record

RAW = envelope.SEALED_RAW  # the field name sealed payloads are bound to
ERASED = "erased"  # archived messages a backfill cannot replay: their subject was forgotten
UNREADABLE = "unreadable"  # nor these: their seal does not open

RAW_ARCHIVE_SCHEMA = {
    "type": "record",
    "name": "ArchivedMessage",
    "namespace": "eventdelivery",
    "doc": "A message as the delivery job read it, before any check.",
    "fields": [
        {"name": "event_id", "type": ["null", "string"], "default": None},
        {
            "name": "received_at",
            "type": {"type": "long", "logicalType": "timestamp-millis"},
            "doc": "The time the message is accounted at: its received_at, or its arrival when that is bad.",
        },
        {
            "name": "arrival",
            "type": ["null", {"type": "long", "logicalType": "timestamp-millis"}],
            "default": None,
            "doc": "The Pub/Sub publish time.",
        },
        {
            "name": "attributes",
            "type": {"type": "map", "values": "string"},
            "doc": "The envelope attributes in clear; all of them when the payload is in clear, or was "
            "archived before sealed_attributes existed.",
        },
        {
            "name": "key_id",
            "type": ["null", "string"],
            "default": None,
            "doc": "The key that sealed the payload; null if the payload is in clear or erased.",
        },
        {
            "name": "payload",
            "type": ["null", "bytes"],
            "default": None,
            "doc": "The message data, AES-256-GCM sealed under key_id; null if its subject was forgotten.",
        },
        {
            "name": "sealed_attributes",
            "type": ["null", "bytes"],
            "default": None,
            "doc": "The producer's other attributes, as AES-256-GCM of their JSON under key_id; null when "
            "there are none, or the payload is in clear or erased.",
        },
    ],
}


@functools.cache
def parsed_raw_archive_schema():
    return fastavro.parse_schema(RAW_ARCHIVE_SCHEMA)


class SealRawMessagesFn(SealInBatchesFn):
    """``(id, received_at, (subject, arrival, attributes, data))`` messages in, archive records out."""

    def setup(self):
        super().setup()
        self.under_quarantine = beam.metrics.Metrics.counter(slo.NAMESPACE, "archived_messages_of_unavailable_keys")

    def seal(self, messages):
        name, sealed = self.event_type.name, self.event_type.personal_fields
        subjects = (m[2][0] for m in messages if m[2][0] is not None)
        keys, unavailable = self.available_keys(subjects) if sealed else ({}, {})
        records = []
        for event_id, received_at, (subject, arrival, attributes, data) in messages:
            key_id, payload, clear, sealed_attributes = None, data, dict(attributes), None
            if subject in unavailable:
                self.under_quarantine.inc()
                subject = None
            if sealed or envelope.split_attributes(attributes)[1]:
                key, aead = keys[subject] if subject is not None else self.quarantine_key(received_at)
                key_id = key.key_id if key else None
                payload = encrypt_bytes(aead, data, name, RAW, key_id, event_id) if key else None
                clear, sealed_attributes = seal_attributes(aead, attributes, name, key_id)
            record = {
                "event_id": event_id or None,
                "received_at": received_at,
                "arrival": arrival,
                "attributes": clear,
                "key_id": key_id,
                "payload": payload,
                "sealed_attributes": sealed_attributes,
            }
            records.append((event_id, received_at, record))
        return records


class ArchiveRawMessages(beam.PTransform):
    """Raw messages, as parsing tags them, in; one archive file per hour, pane, shard and writer out.

    ``settings`` are the job's ``DeliverySettings``: the archive is bucketed like the events.
    """

    def __init__(self, settings, key_cache: JobKeyCache):
        super().__init__()
        self.settings = settings
        self.key_cache = key_cache

    def expand(self, raw):
        s = self.settings
        return (
            raw
            | "SealRawMessages" >> beam.ParDo(SealRawMessagesFn(s.event_type, self.key_cache))
            | "BucketRawMessages" >> BucketByHour(s)
            | "WriteRawArchive"
            >> WriteAvroPanes(s, s.layout.raw_archive, ARCHIVED, RAW_ARCHIVE_SCHEMA, prepared_record)
        )


class ReplayArchiveFn(beam.DoFn):
    """An archive file in; its messages out as they arrived, with their publish time.

    A message sealed under a key that is gone (its subject was forgotten) cannot be
    replayed; it is counted as ``erased``. One whose seal does not open (altered at rest,
    moved from another record, or sealed before payloads were bound to their event id and
    format) is not replayed either; it is counted as ``unreadable``.
    """

    def __init__(self, event_type: EventType, key_cache: JobKeyCache):
        self.event_type = event_type
        self.key_cache = key_cache

    def setup(self):
        use_emulator_credentials()
        self.cache = self.key_cache.acquire()
        self.erased = beam.metrics.Metrics.counter("backfill", ERASED)
        self.unreadable = beam.metrics.Metrics.counter("backfill", UNREADABLE)
        self.replayed = beam.metrics.Metrics.counter("backfill", "replayed")

    def process(self, path: str):
        records = files.read_avro(path)
        keys = self.cache.data_keys(r["key_id"] for r in records if r["key_id"])  # one keystore read per file
        name, erased, unreadable = self.event_type.name, 0, 0
        for record in records:
            data, attributes, key_id = record["payload"], record["attributes"], record["key_id"]
            if key_id is not None:
                aead = keys[key_id][1]
                try:
                    data = decrypt_bytes(aead, data, name, RAW, key_id, record["event_id"]) if aead and data else None
                    attributes = open_attributes(aead, record, name, key_id) if data is not None else None
                except UndecryptableField:
                    unreadable += 1
                    continue
            if data is None:
                erased += 1
                continue
            yield PubsubMessage(data, attributes, publish_time=record["arrival"])
        self.erased.inc(erased)
        self.unreadable.inc(unreadable)
        self.replayed.inc(len(records) - erased - unreadable)

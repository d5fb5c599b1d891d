"""Personal data: encrypt it per subject before anything is written (crypto-shredding).

Every field the schema marks personal becomes AES-256-GCM ciphertext under its data
subject's key; the record keeps the key id in clear. Keys are looked up once per pane
(a batch) through a cache that all steps of a job share in each worker process
(``JobKeyCache``). A forgotten subject's fields are delivered as
null, with no key id, and counted. Dead-letter payloads, which may hold personal data
that never passed validation, are sealed with the type's quarantine key.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.utils.shared import Shared

from event_delivery.contract.dead_letters import quarantine_key_name
from event_delivery.contract.registry import EventType
from event_delivery.keys.cache import KeyCache
from event_delivery.keys.config import KeyConfig
from event_delivery.keys.fields import encrypt_bytes, encrypt_value
from transforms.reports import FORGOTTEN, report


class JobKeyCache:
    """A handle, made once per job, to one ``KeyCache`` per worker process that every
    step of the job holding the handle shares: a key one step read is there for the
    next. Another job, or another run of it in the same process, gets a cache of its
    own, so no key outlives the job that read it by more than the cache's TTL."""

    def __init__(self, keys: KeyConfig):
        self.keys = keys
        self._handle = Shared()

    def acquire(self) -> KeyCache:
        return self._handle.acquire(lambda: KeyCache(self.keys.open(), self.keys.cache_ttl_seconds))


class EncryptPersonalFieldsFn(beam.DoFn):
    def __init__(self, event_type: EventType, key_cache: JobKeyCache):
        self.event_type = event_type
        self.key_cache = key_cache

    def setup(self):
        self.cache = self.key_cache.acquire()
        self.forgotten = beam.metrics.Metrics.counter("delivery", "forgotten_subject_events")

    def process(self, pane):
        shard, events = pane
        name, subject_field, personal = (
            self.event_type.name,
            self.event_type.subject_field,
            self.event_type.personal_fields,
        )
        keys = self.cache.lookup(fields[subject_field] for _, _, fields in events)
        protected, forgotten = [], 0
        for event_id, received_at, fields in events:
            key, aead = keys[fields[subject_field]]
            sealed = dict(fields)
            if key is None:
                forgotten += 1
                sealed["key_id"] = None
                for field in personal:
                    sealed[field] = None
            else:
                sealed["key_id"] = key.key_id
                for field in personal:
                    value = fields[field]
                    sealed[field] = None if value is None else encrypt_value(aead, value, name, field, key.key_id)
            protected.append((event_id, received_at, sealed))
        yield shard, protected
        if forgotten:
            self.forgotten.inc(forgotten)
            yield beam.pvalue.TaggedOutput(FORGOTTEN, report(FORGOTTEN, forgotten))


class EncryptPersonalFields(beam.PTransform):
    """``(shard, [events])`` panes in; ``events`` panes with personal fields sealed, and
    ``forgotten`` reports, out. Types without a data subject pass through."""

    def __init__(self, event_type: EventType, key_cache: JobKeyCache):
        super().__init__()
        self.event_type = event_type
        self.key_cache = key_cache

    def expand(self, panes):
        if not self.event_type.subject_field:
            return {"events": panes, FORGOTTEN: panes | "NoSubjects" >> beam.FlatMap(lambda _: [])}
        encrypt = beam.ParDo(EncryptPersonalFieldsFn(self.event_type, self.key_cache))
        return panes | "SealFields" >> encrypt.with_outputs(FORGOTTEN, main="events")


class QuarantineDeadLettersFn(beam.DoFn):
    def __init__(self, event_type_name: str, keys: KeyConfig):
        self.event_type_name = event_type_name
        self.keys = keys

    def setup(self):
        self.key = self.keys.open().named_key(quarantine_key_name(self.event_type_name))
        self.aead = self.key.aead

    def process(self, element):
        event_id, received_at, record = element
        sealed = dict(record)
        sealed["payload"] = encrypt_bytes(
            self.aead, record["payload"], self.event_type_name, "payload", self.key.key_id
        )
        sealed["quarantine_key_id"] = self.key.key_id
        yield event_id, received_at, sealed


class QuarantineDeadLetters(beam.PTransform):
    """Dead letters in and out, their raw payloads sealed with the type's quarantine key."""

    def __init__(self, event_type_name: str, keys: KeyConfig):
        super().__init__()
        self.fn = QuarantineDeadLettersFn(event_type_name, keys)

    def expand(self, dead_letters):
        return dead_letters | "SealPayloads" >> beam.ParDo(self.fn)

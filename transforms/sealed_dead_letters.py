"""Dead letters sealed before they are written. A payload is sealed under the subject's key only
when validation vouched for the subject (a valid event's whose write failed); any other, which
may hold personal data that never passed validation, under the type's quarantine key: a
subject id that only a malformed message names gets no key, so hostile input cannot grow the
keystore.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from event_delivery.contract import envelope, slo
from event_delivery.contract.dead_letters import ErrorKind, subject_named_in
from event_delivery.contract.registry import EventType
from event_delivery.keys.fields import decrypt_value, encrypt_bytes
from transforms.declared_types import ANY_OUTPUT
from transforms.records import RecordCoder
from transforms.sealing import JobKeyCache, SealInBatchesFn, dead_letter_as_arrived, seal_attributes

_NOT_FIELDS = ("event_id", "received_at", "key_id")  # what a delivered record adds to the message's fields


@ANY_OUTPUT
class UnsealFailedWritesFn(beam.DoFn):
    """``(reason, [encoded events])`` in (``transforms.records``); each event out as a ``write_failed`` dead letter
    whose payload is the message as it arrived, its personal fields decrypted again, so
    that ``SealDeadLetters`` seals it under its subject's key and a redrive can replay it.
    This runs only on the rare failed write; its output goes straight to sealing."""

    def __init__(self, event_type: EventType, key_cache: JobKeyCache):
        self.event_type = event_type
        self.key_cache = key_cache

    def setup(self):
        self.cache = self.key_cache.acquire()
        self.records = RecordCoder(self.event_type.parsed_delivered_schema)

    def process(self, failed_write):
        reason, events = failed_write
        name, personal = self.event_type.name, self.event_type.personal_fields
        records = [self.records.decode(event[2]) for event in events]
        keys = self.cache.data_keys(record["key_id"] for record in records if record.get("key_id"))
        for (event_id, received_at, *_), record in zip(events, records, strict=True):
            key_id = record.get("key_id")
            fields = {k: v for k, v in record.items() if k not in _NOT_FIELDS}
            aead = keys[key_id][1] if key_id else None
            for field in personal:
                if aead is None:  # its subject was forgotten meanwhile: nothing personal is kept
                    fields[field] = None
                elif fields[field] is not None:
                    fields[field] = decrypt_value(aead, fields[field], name, field, key_id, event_id)
            yield dead_letter_as_arrived(name, ErrorKind.WRITE_FAILED, reason, event_id, received_at, fields)


class DeadLetterFailedWrites(beam.PTransform):
    """Failed writes (see ``transforms.write``) in; unsealed dead letters out, in the global
    window, as parsing emits them, for ``SealDeadLetters``."""

    def __init__(self, event_type: EventType, key_cache: JobKeyCache):
        super().__init__()
        self.fn = UnsealFailedWritesFn(event_type, key_cache)

    def expand(self, failed_writes):
        return (
            failed_writes
            | "UnsealFailedWrites" >> beam.ParDo(self.fn)
            | "OutOfTheirHours" >> beam.WindowInto(GlobalWindows())
        )


class SealDeadLettersFn(SealInBatchesFn):
    def setup(self):
        super().setup()
        self.erased = beam.metrics.Metrics.counter(slo.NAMESPACE, "dead_letter_payloads_of_forgotten_subjects")
        self.under_quarantine = beam.metrics.Metrics.counter(slo.NAMESPACE, "dead_letter_payloads_of_unavailable_keys")

    def seal(self, dead_letters):
        name, subject_field = self.event_type.name, self.event_type.subject_field
        # Only a valid event's subject was vouched for by validation: a malformed message may name
        # any string there, and a key made for each would grow the keystore without bound. (A
        # key_unavailable dead letter is a valid event too, but its subject's key is the one that failed.)
        subjects = [
            subject_named_in(record["payload"], subject_field)
            if record["error_kind"] == ErrorKind.WRITE_FAILED.name
            else None
            for _, _, record in dead_letters
        ]
        keys, unavailable = self.available_keys(s for s in subjects if s)
        sealed_letters = []
        for (event_id, received_at, record), subject in zip(dead_letters, subjects, strict=True):
            if subject in unavailable:
                self.under_quarantine.inc()
                subject = None
            key, aead = keys[subject] if subject else self.quarantine_key(received_at)
            key_id = key.key_id if key else None
            clear, sealed_attributes = seal_attributes(aead, record["attributes"], name, key_id)
            sealed = dict(record, attributes=clear, sealed_attributes=sealed_attributes, payload=None)
            sealed["quarantine_key_id"] = key_id
            if key is None:
                self.erased.inc()  # the subject was forgotten: nothing of it is kept
            else:
                sealed["payload"] = encrypt_bytes(
                    aead, record["payload"], name, envelope.SEALED_PAYLOAD, key_id, record["event_id"]
                )
            sealed_letters.append((event_id, received_at, sealed))
        return sealed_letters


class SealDeadLetters(beam.PTransform):
    """Dead letters in and out, their raw payloads sealed: a valid event's whose write failed under
    its subject's key (so forgetting the subject erases it here too), dropped if the subject was
    forgotten; any other under the type's quarantine key, which a retention bound limits: a
    message that failed validation, even one naming a subject, a payload whose subject's key is
    unavailable, and always a ``key_unavailable`` dead letter's."""

    def __init__(self, event_type: EventType, key_cache: JobKeyCache):
        super().__init__()
        self.fn = SealDeadLettersFn(event_type, key_cache)

    def expand(self, dead_letters):
        return dead_letters | "SealPayloads" >> beam.ParDo(self.fn)

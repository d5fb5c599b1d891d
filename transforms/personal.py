"""Personal data: encrypt it per subject before anything is written (crypto-shredding).

Every field the schema marks personal becomes AES-256-GCM ciphertext under its data
subject's key, in the bundle that read the message, before any shuffle; the record
keeps the key id in clear. Keys are looked up in batches through a cache that all
steps of a job share in each worker process (``transforms.sealing.JobKeyCache``). A
forgotten subject's fields are delivered as null, with no key id, and counted. How keys
that cannot be had are handled, without failing a bundle for good: ``transforms.sealing``.
"""

from __future__ import annotations

import apache_beam as beam

from event_delivery.cloud.files import AvroWriteError
from event_delivery.contract import slo
from event_delivery.contract.dead_letters import ErrorKind
from event_delivery.contract.registry import EventType
from event_delivery.keys.fields import encrypt_fields
from transforms import records
from transforms.records import RecordCoder, encoded_event, is_forgotten
from transforms.reports import DELIVERED, FORGOTTEN, report
from transforms.results import Result
from transforms.sealing import KEY_UNAVAILABLE, JobKeyCache, SealInBatchesFn, dead_letter_as_arrived
from transforms.write import WRITE_FAILED, failed_write_reason

DEAD_LETTERS = "dead_letters"  # the output of events that cannot be delivered: their key, or their record


class EncodeRecordsFn(beam.DoFn):
    """Events of a type without data subjects, each encoded as its delivered record (``transforms.records``)."""

    def __init__(self, event_type: EventType):
        self.event_type = event_type

    def setup(self):
        self.records = RecordCoder(self.event_type.parsed_delivered_schema)
        self.write_failed = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.dead_lettered(WRITE_FAILED))

    def process(self, event):
        event_id, received_at, fields = event
        yield encoded_or_dead_letter(self, event_id, received_at, fields, fields, forgotten=False)


def encoded_or_dead_letter(fn, event_id: str, received_at: int, fields: dict, sealed: dict, forgotten: bool):
    """The sealed event encoded as its record, or, when the schema does not take it (a record that no
    file of the type could hold), a ``write_failed`` dead letter of it as it arrived, counted on ``fn``."""
    try:
        return encoded_event(
            event_id, received_at, fn.records.encode(records.event_record((event_id, received_at, sealed))), forgotten
        )
    except AvroWriteError:
        fn.write_failed.inc()
        detail = failed_write_reason(DELIVERED, AvroWriteError.__name__)
        dead = dead_letter_as_arrived(fn.event_type.name, ErrorKind.WRITE_FAILED, detail, event_id, received_at, fields)
        return beam.pvalue.TaggedOutput(DEAD_LETTERS, dead)


class EncryptPersonalFieldsFn(SealInBatchesFn):
    def setup(self):
        super().setup()
        self.records = RecordCoder(self.event_type.parsed_delivered_schema)
        self.forgotten = beam.metrics.Metrics.counter(slo.NAMESPACE, "forgotten_subject_events")
        self.key_unavailable = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.dead_lettered(KEY_UNAVAILABLE))
        self.write_failed = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.dead_lettered(WRITE_FAILED))

    def seal(self, events):
        name, subject_field = self.event_type.name, self.event_type.subject_field
        personal = self.event_type.personal_fields
        keys, unavailable = self.available_keys(fields[subject_field] for _, _, fields in events)
        sealed_events = []
        for event_id, received_at, fields in events:
            error = unavailable.get(fields[subject_field])
            if error:
                detail = f"the keystore cannot give the key of the subject in {subject_field!r}: {error}"
                dead = dead_letter_as_arrived(name, ErrorKind.KEY_UNAVAILABLE, detail, event_id, received_at, fields)
                sealed_events.append(beam.pvalue.TaggedOutput(DEAD_LETTERS, dead))
                self.key_unavailable.inc()
                continue
            key, aead = keys[fields[subject_field]]
            sealed = dict(fields)
            if key is None:
                sealed["key_id"] = None
                for field in personal:
                    sealed[field] = None
            else:
                sealed["key_id"] = key.key_id
                sealed.update(encrypt_fields(aead, fields, personal, name, key.key_id, event_id))
            sealed_events.append(
                encoded_or_dead_letter(self, event_id, received_at, fields, sealed, forgotten=key is None)
            )
        # Counted once encoded: a forgotten subject's event whose record failed is a dead letter only.
        forgotten = sum(1 for event in sealed_events if isinstance(event, tuple) and is_forgotten(event))
        if forgotten:
            self.forgotten.inc(forgotten)
        return sealed_events


class EncryptPersonalFields(beam.PTransform):
    """``(event_id, received_at_millis, fields)`` events in; out (a ``Result``'s ``output``), each as its
    encoded delivered record (``transforms.records``), every personal field sealed under its subject's
    key and the ``key_id`` added. A forgotten subject's fields become null, with no key id. Types
    without a data subject are encoded alone.

    An event whose subject's key is unavailable (see the module) goes to the ``dead_letters``
    instead, as an unsealed ``key_unavailable`` dead letter for ``SealDeadLetters``, in the global
    window; one whose record the schema does not take, as a ``write_failed`` one.

    It belongs right after parsing, so that nothing personal crosses a shuffle or rests
    in a runner's state in clear.
    """

    def __init__(self, event_type: EventType, key_cache: JobKeyCache):
        super().__init__()
        self.event_type = event_type
        self.key_cache = key_cache

    def expand(self, events):
        if self.event_type.subject_field:
            fn = EncryptPersonalFieldsFn(self.event_type, self.key_cache)
            step = "SealFields"
        else:
            fn, step = EncodeRecordsFn(self.event_type), "EncodeRecords"
        sealed = events | step >> beam.ParDo(fn).with_outputs(DEAD_LETTERS, main="events")
        return Result(sealed.events, sealed[DEAD_LETTERS])


def _forgotten_in(pane):
    """A ``forgotten`` report for a pane of sealed events of forgotten subjects, if any."""
    forgotten = sum(1 for event in pane[1] if is_forgotten(event))
    if forgotten:
        yield report(FORGOTTEN, forgotten)


class CountForgotten(beam.PTransform):
    """``(pane key, [sealed events])`` panes in; ``forgotten`` hour reports out (for the manifest)."""

    def __init__(self, event_type: EventType):
        super().__init__()
        self.event_type = event_type

    def expand(self, panes):
        if not self.event_type.subject_field:
            return panes | "NoSubjects" >> beam.FlatMap(lambda _: [])
        return panes | "CountForgottenSubjects" >> beam.FlatMap(_forgotten_in)

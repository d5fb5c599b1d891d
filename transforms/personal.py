"""Personal data: encrypt it per subject before anything is written (crypto-shredding).

Every field the schema marks personal becomes AES-256-GCM ciphertext under its data
subject's key, in the bundle that read the message, before any shuffle; the record
keeps the key id in clear. Keys are looked up in batches through a cache that all
steps of a job share in each worker process (``JobKeyCache``). A forgotten subject's
fields are delivered as null, with no key id, and counted. Dead-letter payloads are sealed
under the subject's key only when validation vouched for the subject (a valid event's whose
write failed); any other, which may hold personal data that never passed validation, under
the type's quarantine key: a subject id that only a malformed message names gets no key, so
hostile input cannot grow the keystore. With a sealed payload go the producer's attributes
other than the envelope's, which the contract does not restrict (``seal_attributes``).

No bundle fails forever on one subject's key. A key the keystore cannot give, for good
(``UNAVAILABLE``: a wrapped key that no longer unwraps, a key-wrapping key or KEK version
that is gone, access denied), holds back only its subject's events: they become
``key_unavailable`` dead letters, sealed under the quarantine key, which a redrive replays
once the key is mended. A subject id that no key can be made for (one UTF-8 cannot encode:
a JSON escape can spell a lone surrogate) is treated the same way, and counted. A transient
keystore error is retried (``transforms.retries``), then left to the runner, which retries
the bundle.
"""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows
from apache_beam.utils.shared import Shared
from apache_beam.utils.timestamp import Timestamp
from cryptography.exceptions import InvalidTag
from google.api_core import exceptions as google_errors

from event_delivery.contract import envelope, slo
from event_delivery.contract.dead_letters import ErrorKind, dead_letter, quarantine_key_name, subject_named_in
from event_delivery.contract.registry import EventType
from event_delivery.keys.cache import KeyCache
from event_delivery.keys.config import KeyConfig
from event_delivery.keys.fields import decrypt_value, encrypt_bytes, encrypt_value
from event_delivery.keys.kek import KeysNotFound, KmsIntegrityError, UnknownWrappedFormat
from event_delivery.keys.keystore import SubjectKey
from event_delivery.keys.wrapping import KeyWrappingReplaced
from transforms import retries
from transforms.reports import FORGOTTEN, report

KEY_UNAVAILABLE = ErrorKind.KEY_UNAVAILABLE.value  # the output of events whose subject's key is unavailable
# Keystore errors that no retry mends: a wrapped key that no longer unwraps (altered, or of a format
# this code does not read), a key-wrapping key or KEK version that is gone, a key, table or KMS key
# the job may not use or that does not exist.
UNAVAILABLE = (
    InvalidTag,
    UnknownWrappedFormat,
    KeysNotFound,
    *retries.DENIED,
)
# Keystore errors that pass: the service busy, slow or out of reach, a KMS response altered on the way,
# rotations that replaced the key-wrapping key at every attempt to store a new key.
TRANSIENT = (
    google_errors.ServerError,
    google_errors.TooManyRequests,
    ConnectionError,
    TimeoutError,
    KmsIntegrityError,
    KeyWrappingReplaced,
)
UNENCODABLE = "UnencodableSubjectId"  # why a subject id that UTF-8 cannot encode has no key


def _encodes(subject: str) -> bool:
    """Whether UTF-8 can encode ``subject``, as the keystore's pseudonym does."""
    if subject.isascii():
        return True
    try:
        subject.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def seal_attributes(aead, attributes: dict, event_type: str, key_id: str | None) -> tuple[dict, bytes | None]:
    """``(clear, sealed)``: the envelope attributes, kept in clear, and the others as one AES-GCM
    ciphertext of their JSON, under the key that seals the payload, bound to the field name
    ``attributes``; None when there are no others. Without a key (a forgotten subject) the
    others are dropped, like the payload."""
    clear, others = envelope.split_attributes(attributes)
    if not others or aead is None:
        return clear, None
    event_id = clear.get(envelope.EVENT_ID)
    return clear, encrypt_value(aead, others, event_type, envelope.SEALED_ATTRIBUTES, key_id, event_id)


def open_attributes(aead, record: dict, event_type: str, key_id: str) -> dict:
    """A sealed record's attributes whole again: the clear ones and, if any, the sealed others.
    A record written before attributes were sealed has them all in clear."""
    attributes = dict(record["attributes"])
    if record.get("sealed_attributes"):
        attributes.update(
            decrypt_value(
                aead,
                record["sealed_attributes"],
                event_type,
                envelope.SEALED_ATTRIBUTES,
                key_id,
                attributes.get(envelope.EVENT_ID),
            )
        )
    return attributes


class JobKeyCache:
    """A handle, made once per job, to one ``KeyCache`` per worker process that every
    step of the job holding the handle shares: a key one step read is there for the
    next. Another job, or another run of it in the same process, gets a cache of its
    own, so no key outlives the job that read it by more than the cache's TTL. A job serves
    one event type, whose name is the scope of the subject keys it uses."""

    def __init__(self, keys: KeyConfig, scope: str):
        self.keys = keys
        self.scope = scope
        self._handle = Shared()

    def acquire(self) -> KeyCache:
        return self._handle.acquire(lambda: KeyCache(self.keys.open(), self.scope, self.keys.cache_ttl_seconds))


class SealInBatchesFn(beam.DoFn):
    """Seals elements in the bundle that read them, ``BATCH`` at a time, so that keys are
    looked up in one keystore round trip per batch of first-seen subjects.

    Sealing runs before the first shuffle, where elements are in the global window and
    their timestamps do not matter yet: the steps after it stamp each element with its
    ``received_at`` before they window it.
    """

    BATCH = 1000

    def __init__(self, event_type: EventType, key_cache: JobKeyCache):
        self.event_type = event_type
        self.key_cache = key_cache

    def setup(self):
        self.cache = self.key_cache.acquire()
        self.unencodable = beam.metrics.Metrics.counter(slo.NAMESPACE, "unencodable_subject_ids")

    def start_bundle(self):
        self.pending = []

    def quarantine_key(self, received_at_millis: int) -> tuple[SubjectKey, object]:
        """``(key, aead)``: the type's quarantine key for the UTC day of ``received_at``, which seals
        what names no subject, or whose subject's key is unavailable; the worker's cache asks the
        keystore once per day. When even this key is unavailable, the keystore as a whole is
        broken, not one subject's key: the error is raised, and the runner retries the bundle
        until the keystore is mended."""
        name = quarantine_key_name(self.event_type.name, received_at_millis)
        return self.with_retries(lambda: self.cache.named_key(name))

    def available_keys(self, subjects) -> tuple[dict, dict[str, str]]:
        """``(keys, unavailable)``: the keys of a batch of subjects (one per element), as
        ``KeyCache.lookup`` gives them, and the subjects whose key the keystore cannot give, for
        good, with the error's name.

        A subject id that UTF-8 cannot encode (a lone surrogate, which a JSON escape can spell)
        has no pseudonym, so no key can ever be made for it: it is never looked up, it is
        unavailable (``UNENCODABLE``), and each element naming one is counted."""
        subjects = list(subjects)
        unencodable = [s for s in subjects if not _encodes(s)]
        if not unencodable:
            return self._keys_of(sorted(set(subjects)))
        self.unencodable.inc(len(unencodable))
        keys, unavailable = self._keys_of(sorted({s for s in subjects if _encodes(s)}))
        return keys, {**unavailable, **dict.fromkeys(unencodable, UNENCODABLE)}

    def _keys_of(self, subjects: list[str]) -> tuple[dict, dict[str, str]]:
        """``available_keys`` of sorted, distinct, encodable subjects. The batch costs one lookup;
        only when that fails for good are its halves looked up, and theirs, until the subjects at
        fault are found: one broken key holds back no other subject's events, and a batch with
        one costs about 2 log2(batch) lookups more."""
        try:
            return self.with_retries(lambda: self.cache.lookup(subjects)), {}
        except UNAVAILABLE as error:
            if len(subjects) <= 1:
                return {}, dict.fromkeys(subjects, type(error).__name__)
        half = len(subjects) // 2
        keys, unavailable = self._keys_of(subjects[:half])
        more_keys, more_unavailable = self._keys_of(subjects[half:])
        return {**keys, **more_keys}, {**unavailable, **more_unavailable}

    @staticmethod
    def with_retries(lookup):
        """``lookup()``, tried again after a transient keystore error (``TRANSIENT``), then raised
        for the runner to retry the bundle. Any other error is raised at once: ``UNAVAILABLE``
        for the caller to give up the subjects at fault, the rest as a bug."""
        return retries.with_retries(lookup, passing=lambda error: isinstance(error, TRANSIENT))

    def process(self, element):
        self.pending.append(element)
        if len(self.pending) >= self.BATCH:
            batch, self.pending = self.pending, []
            yield from self.seal(batch)  # in the global window, as the element that filled the batch

    def finish_bundle(self):
        batch, self.pending = self.pending, []
        for sealed in self.seal(batch) if batch else ():
            yield self.in_global_window(sealed)

    @classmethod
    def in_global_window(cls, output):
        """An output of ``seal`` as ``finish_bundle`` must give it: a windowed value (tagged, if it was)."""
        if isinstance(output, beam.pvalue.TaggedOutput):
            return beam.pvalue.TaggedOutput(output.tag, cls.in_global_window(output.value))
        return GlobalWindows.windowed_value(output, Timestamp(micros=output[1] * 1000))

    def seal(self, batch: list) -> list:
        """The batch's outputs: ``(id, received_at_millis, sealed)`` elements, or such elements tagged."""
        raise NotImplementedError


class EncryptPersonalFieldsFn(SealInBatchesFn):
    def setup(self):
        super().setup()
        self.forgotten = beam.metrics.Metrics.counter(slo.NAMESPACE, "forgotten_subject_events")
        self.key_unavailable = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.dead_lettered(KEY_UNAVAILABLE))

    def seal(self, events):
        name, subject_field, personal = (
            self.event_type.name,
            self.event_type.subject_field,
            self.event_type.personal_fields,
        )
        keys, unavailable = self.available_keys(fields[subject_field] for _, _, fields in events)
        sealed_events, forgotten = [], 0
        for event_id, received_at, fields in events:
            error = unavailable.get(fields[subject_field])
            if error:
                detail = f"the keystore cannot give the key of the subject in {subject_field!r}: {error}"
                dead = dead_letter_as_arrived(name, ErrorKind.KEY_UNAVAILABLE, detail, event_id, received_at, fields)
                sealed_events.append(beam.pvalue.TaggedOutput(KEY_UNAVAILABLE, dead))
                self.key_unavailable.inc()
                continue
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
                    sealed[field] = (
                        None if value is None else encrypt_value(aead, value, name, field, key.key_id, event_id)
                    )
            sealed_events.append((event_id, received_at, sealed))
        if forgotten:
            self.forgotten.inc(forgotten)
        return sealed_events


class EncryptPersonalFields(beam.PTransform):
    """``(event_id, received_at_millis, fields)`` events in, the same out (``events``) with every
    personal field sealed under its subject's key and the ``key_id`` added. A forgotten subject's
    fields become null, with no key id. Types without a data subject pass through.

    An event whose subject's key is unavailable (see the module) goes to the ``key_unavailable``
    output instead, as an unsealed dead letter for ``SealDeadLetters``, in the global window.

    It belongs right after parsing, so that nothing personal crosses a shuffle or rests
    in a runner's state in clear.
    """

    def __init__(self, event_type: EventType, key_cache: JobKeyCache):
        super().__init__()
        self.event_type = event_type
        self.key_cache = key_cache

    def expand(self, events):
        if not self.event_type.subject_field:
            return {"events": events, KEY_UNAVAILABLE: events | "NoSubjects" >> beam.FlatMap(lambda _: [])}
        fn = EncryptPersonalFieldsFn(self.event_type, self.key_cache)
        sealed = events | "SealFields" >> beam.ParDo(fn).with_outputs(KEY_UNAVAILABLE, main="events")
        return {"events": sealed.events, KEY_UNAVAILABLE: sealed[KEY_UNAVAILABLE]}


def _forgotten_in(pane):
    """A ``forgotten`` report for a pane of sealed events of forgotten subjects, if any."""
    forgotten = sum(1 for _, _, fields in pane[1] if fields["key_id"] is None)
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


def dead_letter_as_arrived(event_type: str, kind: ErrorKind, detail: str, event_id, received_at, fields) -> tuple:
    """``(event_id, received_at_millis, dead letter)`` for a valid event in clear: its payload is the
    message as it arrived (the fields as JSON), with the envelope's attributes, so that a redrive
    replays it. ``SealDeadLetters`` seals it."""
    payload = json.dumps(fields, separators=(",", ":")).encode("utf-8")
    attributes = {
        envelope.EVENT_ID: event_id,
        envelope.RECEIVED_AT: envelope.format_received_at(received_at),
        envelope.EVENT_TYPE: event_type,
    }
    return event_id, received_at, dead_letter(event_type, kind, detail, event_id, received_at, attributes, payload)


class UnsealFailedWritesFn(beam.DoFn):
    """``(reason, [sealed events])`` in; each event out as a ``write_failed`` dead letter
    whose payload is the message as it arrived, its personal fields decrypted again, so
    that ``SealDeadLetters`` seals it under its subject's key and a redrive can replay it.
    This runs only on the rare failed write; its output goes straight to sealing."""

    def __init__(self, event_type: EventType, key_cache: JobKeyCache):
        self.event_type = event_type
        self.key_cache = key_cache

    def setup(self):
        self.cache = self.key_cache.acquire()

    def process(self, failed_write):
        reason, events = failed_write
        name, personal = self.event_type.name, self.event_type.personal_fields
        keys = self.cache.data_keys(fields["key_id"] for _, _, fields in events if fields.get("key_id"))
        for event_id, received_at, sealed in events:
            fields = {k: v for k, v in sealed.items() if k != "key_id"}
            aead = keys[sealed["key_id"]][1] if sealed.get("key_id") else None
            for field in personal:
                if aead is None:  # its subject was forgotten meanwhile: nothing personal is kept
                    fields[field] = None
                elif fields[field] is not None:
                    fields[field] = decrypt_value(aead, fields[field], name, field, sealed["key_id"], event_id)
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

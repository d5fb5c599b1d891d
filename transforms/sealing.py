"""Sealing in batches under subjects' keys, shared by every step that seals: the job's key
cache, the lookup of a bundle's keys, and what happens when a key cannot be had.

No bundle fails forever on one subject's key. A key the keystore cannot give, for good
(``UNAVAILABLE``: a wrapped key that no longer unwraps, a key-wrapping key or KEK version
that is gone, access denied), holds back only its subject's events: they become
``key_unavailable`` dead letters, sealed under the quarantine key, which a redrive replays
once the key is mended. A subject id that no key can be made for (one UTF-8 cannot encode:
a JSON escape can spell a lone surrogate) is treated the same way, and counted. A transient
keystore error is retried (``transforms.retries``), then left to the runner, which retries
the bundle. With a sealed payload go the producer's attributes other than the envelope's,
which the contract does not restrict (``seal_attributes``).
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
from event_delivery.contract.dead_letters import ErrorKind, dead_letter, quarantine_key_name
from event_delivery.contract.registry import EventType
from event_delivery.keys.cache import KeyCache
from event_delivery.keys.config import KeyConfig
from event_delivery.keys.fields import decrypt_value, encrypt_value
from event_delivery.keys.kek import KeysNotFound, KmsIntegrityError, UnknownWrappedFormat
from event_delivery.keys.keystore import SubjectKey
from event_delivery.keys.wrapping import KeyWrappingReplaced
from transforms import retries
from transforms.declared_types import ANY_OUTPUT

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


@ANY_OUTPUT
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

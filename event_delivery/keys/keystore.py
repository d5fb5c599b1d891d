"""The subject keystore: one random data key per data subject and event type, stored only wrapped.

Layout, the same in every backend:

- a *subject* entry, keyed by the subject's pseudonym in a *scope*, names the subject's key
  id in that scope, or is a tombstone once the subject is forgotten. A scope is an event
  type: its pseudonym is a keyed HMAC of the subject's id under the scope's own secret, the
  named key ``subject-pseudonyms/<type>``, so the keystore holds no subject id in clear,
  and a subject's entries in two types cannot be linked, nor its key ids in the records.
  The *unscoped* pseudonym (the secret ``subject-pseudonyms``) holds the subject's
  tombstone, and the one key of keystores from before there were scopes;
- a *data key* entry, keyed by the opaque key id, holds the data key wrapped (with the
  key id as associated data);
- a *named key* entry (the pseudonym secrets, the quarantine keys, one per type and day, the
  key-wrapping keys) names a data key by purpose.

Two tiers of wrapping keep the key-encryption key (Cloud KMS) off the hot path. The KEK
wraps only *key-wrapping keys*: one random 256-bit key per calendar month (UTC), stored
as the named key ``key-wrapping/<YYYY-MM>``. Those wrap every other key here, in the
process (``WRAPPED_LOCALLY``): ``0x02 || key-wrapping key id (16 bytes) || nonce ||
AES-256-GCM``, with the header and the key id as associated data. A process unwraps each
key-wrapping key once, with one KEK call, and keeps it: no data key costs a KMS call,
whether created or read. Rotating the KEK re-wraps the few key-wrapping keys only.

``forget`` writes the unscoped tombstone, then deletes the subject's key in every scope that
exists (the scopes are the pseudonym secrets stored, so a type removed from the registry is
found too) and leaves a tombstone in each, so the subject's ciphertexts can never be
decrypted again, and no new key is ever created for it, in any type. Two workers that meet
a new subject at once end up with one key: the first subject entry written wins,
atomically, and the loser's key is deleted.

Backends: SQLite (embedded, the default for local runs) and Cloud Bigtable
(production; tested against the Bigtable emulator).
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import secrets
import struct
import time
from collections.abc import Callable, Iterator

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.hmac import HMAC

from event_delivery.keys.kek import (
    KEY_BYTES,
    NONCE_BYTES,
    KeyEncryptionKey,
    KeysNotFound,
    kek_version_of,
    wrapped_by_kek,
)

PSEUDONYM_KEY = "subject-pseudonyms"  # the unscoped pseudonyms: tombstones, and keys from before scopes
SCOPED_PSEUDONYM_KEY = PSEUDONYM_KEY + "/{scope}"
KEY_WRAPPING_KEY = "key-wrapping/{period}"
WRAPPED_LOCALLY = 2
LOCAL_HEADER = struct.Struct(">B16s")  # format, the key-wrapping key's id
SCAN_BATCH = 500
ORPHAN_GRACE_SECONDS = 3600


@dataclasses.dataclass(frozen=True)
class SubjectKey:
    key_id: str
    data_key: bytes = dataclasses.field(repr=False)

    @property
    def aead(self) -> AESGCM:
        return AESGCM(self.data_key)


@dataclasses.dataclass(frozen=True)
class RewrapCounts:
    rewrapped: int = 0
    current: int = 0  # need nothing: already under the primary version, or wrapped by a key-wrapping key
    vanished: int = 0  # deleted (forgotten) between the read and the re-wrap


def new_key_id() -> str:
    """A random, opaque key id: it says nothing about its subject."""
    return secrets.token_hex(16)


def key_wrapping_period(now: float) -> str:
    """The calendar month (UTC) whose key-wrapping key wraps the keys made at ``now``."""
    return time.strftime("%Y-%m", time.gmtime(now))


class Keystore(abc.ABC):
    """Subject keys, wrapped by a key-encryption key, in some backend."""

    def __init__(self, kek: KeyEncryptionKey, clock: Callable[[], float] = time.time):
        self.kek = kek
        self.clock = clock
        self._pseudonym_macs: dict[str, HMAC] = {}  # by the secret's name; a secret never changes
        self._key_wrapping_keys: dict[str, AESGCM] = {}  # by key id; kept for the life of the process
        self._current_key_wrapping_key: tuple[str, str] | None = None  # (period, key id)

    # Backend primitives. Each call takes a batch, to keep round trips per bundle.
    @abc.abstractmethod
    def _read_subjects(self, pseudonyms: list[str]) -> dict[str, str | None]:
        """Known subjects: pseudonym -> key id, or None for a tombstone."""

    @abc.abstractmethod
    def _create_subjects(self, new: dict[str, tuple[str, bytes]]) -> None:
        """Stores ``pseudonym -> (key id, wrapped key)`` where no entry exists yet; first writer wins."""

    @abc.abstractmethod
    def _read_wrapped_keys(self, key_ids: list[str]) -> dict[str, bytes]:
        """Wrapped data keys that still exist."""

    @abc.abstractmethod
    def _forget(self, pseudonym: str) -> bool:
        """Deletes the subject's data key and leaves a tombstone; True if it had a key."""

    @abc.abstractmethod
    def _named_key_id(self, name: str, candidate: Callable[[], tuple[str, bytes]]) -> str:
        """The key id stored under ``name``; if there is none, stores ``candidate()`` first (and only then makes it)."""

    @abc.abstractmethod
    def _named_keys(self, prefix: str) -> dict[str, str]:
        """Every named key whose name starts with ``prefix``: name -> key id."""

    @abc.abstractmethod
    def _delete_named_key(self, name: str, key_id: str) -> None:
        """Deletes the data key, then the name that points to it (a retry after a failure finishes)."""

    @abc.abstractmethod
    def _scan_wrapped_keys(self) -> Iterator[list[tuple[str, bytes]]]:
        """Every stored ``(key id, wrapped key)``, in batches."""

    @abc.abstractmethod
    def _replace_wrapped_keys(self, rewrapped: dict[str, bytes]) -> int:
        """Stores each key's new wrapping where the key still exists (never bringing back a deleted
        one); returns how many it replaced."""

    @abc.abstractmethod
    def _sweep_orphans(self, grace_seconds: float) -> int:
        """Deletes data keys that no subject or named entry points to and that are older than
        ``grace_seconds``; finishes interrupted forgets. Returns how many keys it deleted."""

    @abc.abstractmethod
    def holds_subjects(self) -> bool:
        """Whether any subject (or tombstone) is stored: a keystore that jobs have used holds some,
        one that was only provisioned holds none."""

    def check(self) -> None:
        """Raises ``KeysNotFound`` unless the keystore exists (what provisioning creates): a first read does."""
        self.holds_subjects()

    # How a key is stored: wrapped by this month's key-wrapping key, which the KEK wraps; bound to its key id.
    def _wrap_key(self, key_id: str, data_key: bytes) -> bytes:
        wrapping_key_id = self._current_wrapping_key_id()
        header = LOCAL_HEADER.pack(WRAPPED_LOCALLY, bytes.fromhex(wrapping_key_id))
        nonce = secrets.token_bytes(NONCE_BYTES)
        aead = self._key_wrapping_key(wrapping_key_id)
        return header + nonce + aead.encrypt(nonce, data_key, header + key_id.encode())

    def _unwrap_key(self, key_id: str, wrapped: bytes) -> bytes:
        if wrapped_by_kek(wrapped):  # a key-wrapping key (or a data key stored before there were any)
            return self.kek.unwrap(wrapped, key_id.encode())
        if len(wrapped) < LOCAL_HEADER.size or wrapped[0] != WRAPPED_LOCALLY:
            return self.kek.unwrap(wrapped, key_id.encode())  # which names the unknown format
        header, body = wrapped[: LOCAL_HEADER.size], wrapped[LOCAL_HEADER.size :]
        aead = self._key_wrapping_key(header[1:].hex())
        return aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], header + key_id.encode())

    def _new_key(self) -> tuple[str, bytes]:
        key_id = new_key_id()
        return key_id, self._wrap_key(key_id, secrets.token_bytes(KEY_BYTES))

    def _new_key_wrapping_key(self) -> tuple[str, bytes]:
        key_id, key = new_key_id(), secrets.token_bytes(KEY_BYTES)
        wrapped = self.kek.wrap(key, key_id.encode())
        self._key_wrapping_keys[key_id] = AESGCM(key)  # if another process's wins, this one is never asked for
        return key_id, wrapped

    def _current_wrapping_key_id(self) -> str:
        """This month's key-wrapping key, made by the first process that needs it (one KEK call a month)."""
        period = key_wrapping_period(self.clock())
        current = self._current_key_wrapping_key
        if current is None or current[0] != period:
            key_id = self._named_key_id(KEY_WRAPPING_KEY.format(period=period), self._new_key_wrapping_key)
            self._current_key_wrapping_key = current = (period, key_id)
        return current[1]

    def _key_wrapping_key(self, key_id: str) -> AESGCM:
        """A key-wrapping key, unwrapped by the KEK the first time this process needs it."""
        aead = self._key_wrapping_keys.get(key_id)
        if aead is None:
            wrapped = self._read_wrapped_keys([key_id]).get(key_id)
            if wrapped is None:
                raise KeysNotFound(f"the key-wrapping key {key_id} is not in the keystore")
            aead = self._key_wrapping_keys[key_id] = AESGCM(self.kek.unwrap(wrapped, key_id.encode()))
        return aead

    # The interface the pipeline and the tools use.
    def _pseudonym(self, secret_name: str, subject_id: str) -> str:
        mac = self._pseudonym_macs.get(secret_name)
        if mac is None:
            mac = self._pseudonym_macs[secret_name] = HMAC(self.named_key(secret_name).data_key, SHA256())
        mac = mac.copy()  # the keyed state, without keying a new HMAC for every subject
        mac.update(subject_id.encode("utf-8"))
        return mac.finalize().hex()[:32]

    def pseudonym(self, subject_id: str, scope: str | None = None) -> str:
        """The subject's pseudonym in ``scope`` (an event type's name), or the unscoped one; the
        first use of a scope creates its secret."""
        return self._pseudonym(PSEUDONYM_KEY if scope is None else SCOPED_PSEUDONYM_KEY.format(scope=scope), subject_id)

    def _pseudonym_secrets(self) -> list[str]:
        """The names of every pseudonym secret stored: the unscoped one and one per scope ever used."""
        scoped = SCOPED_PSEUDONYM_KEY.format(scope="")
        return sorted(n for n in self.named_keys(PSEUDONYM_KEY) if n == PSEUDONYM_KEY or n.startswith(scoped))

    def _forgotten(self, subject_ids) -> set[str]:
        """The subjects among ``subject_ids`` that have the unscoped tombstone, in one batch."""
        by_pseudonym = {self.pseudonym(s): s for s in set(subject_ids)}
        known = self._read_subjects(list(by_pseudonym))
        return {s for p, s in by_pseudonym.items() if p in known and known[p] is None}

    def subject_key_ids(self, subject_ids, create: bool = True, scope: str | None = None) -> dict[str, str | None]:
        """Key ids for many subjects in ``scope`` (an event type's name; None: the unscoped keys of
        keystores from before scopes), in one batch; None for forgotten (or, without ``create``,
        unknown) ones."""
        by_pseudonym = {self.pseudonym(s, scope): s for s in set(subject_ids)}
        known = self._read_subjects(list(by_pseudonym))
        missing = [p for p in by_pseudonym if p not in known]
        if missing and create and scope is not None:
            # A forgotten subject gets no key in a scope it never had one in. The scope's secret
            # exists (made above) before this reads the tombstone, and forget writes the tombstone
            # before it lists the secrets: so either this read sees the tombstone, or forget sees
            # the scope and tombstones the subject there, where a claim made now loses or is erased.
            forgotten = self._forgotten(by_pseudonym[p] for p in missing)
            missing = [p for p in missing if by_pseudonym[p] not in forgotten]
        if missing and create:
            self._create_subjects({pseudonym: self._new_key() for pseudonym in missing})
            known.update(self._read_subjects(missing))
        return {subject: known.get(p) for p, subject in by_pseudonym.items()}

    def subject_keys(self, subject_ids, create: bool = True, scope: str | None = None) -> dict[str, SubjectKey | None]:
        """Keys for many subjects in ``scope``, in one batch; None for forgotten (or, without
        ``create``, unknown) ones."""
        key_ids = self.subject_key_ids(subject_ids, create, scope)
        keys = self.data_keys([k for k in key_ids.values() if k])
        return {s: SubjectKey(k, keys[k]) if k and keys.get(k) else None for s, k in key_ids.items()}

    def key_ids_of(self, subject_id: str) -> list[str]:
        """The subject's current key ids in every scope, the unscoped one included; creates nothing."""
        pseudonyms = [self._pseudonym(name, subject_id) for name in self._pseudonym_secrets()]
        return sorted(k for k in self._read_subjects(pseudonyms).values() if k)

    def data_keys(self, key_ids) -> dict[str, bytes | None]:
        """Unwrapped data keys by key id; None where the key was deleted (its subject forgotten)."""
        wanted = sorted(set(key_ids))
        wrapped = self._read_wrapped_keys(wanted)
        return {k: self._unwrap_key(k, wrapped[k]) if k in wrapped else None for k in wanted}

    def forget(self, subject_id: str) -> bool:
        """Crypto-shreds a subject in every scope: True if a key was deleted, False if there was none
        (tombstones stay). The unscoped tombstone comes first, and only then are the scopes listed:
        a job that makes a scope after the listing sees the tombstone (``subject_key_ids``). A
        forget that fails halfway finishes when run again."""
        deleted = self._forget(self.pseudonym(subject_id))
        for name in self._pseudonym_secrets():
            if name != PSEUDONYM_KEY:
                deleted = self._forget(self._pseudonym(name, subject_id)) or deleted
        return deleted

    def is_forgotten(self, subject_id: str) -> bool:
        """Whether the subject has the unscoped tombstone that forget writes first."""
        return subject_id in self._forgotten([subject_id])

    def named_key(self, name: str) -> SubjectKey:
        """A key kept for a purpose rather than a subject, created on first use (and only then wrapped)."""
        stored_id = self._named_key_id(name, self._new_key)
        return SubjectKey(stored_id, self.data_keys([stored_id])[stored_id])

    def named_keys(self, prefix: str) -> dict[str, str]:
        """The named keys whose name starts with ``prefix``, as name -> key id."""
        return self._named_keys(prefix)

    def delete_named_keys(self, names: dict[str, str]) -> int:
        """Deletes named keys (name -> key id, as ``named_keys`` lists them) for good: what they sealed
        can no longer be read. Returns how many it deleted."""
        for name, key_id in names.items():
            self._delete_named_key(name, key_id)
        return len(names)

    def kek_versions(self) -> collections.Counter:
        """How many stored keys each KEK version wraps (the key-wrapping keys, and any data key stored
        before there were any): a version that wraps none can be destroyed."""
        return collections.Counter(
            kek_version_of(wrapped)
            for batch in self._scan_wrapped_keys()
            for _, wrapped in batch
            if wrapped_by_kek(wrapped)
        )

    def rewrap(self) -> RewrapCounts:
        """Re-wraps every key the KEK wraps under an older version than its primary, so that older
        versions can be destroyed. Safe beside running jobs and forget: a key deleted meanwhile
        stays deleted. Keys wrapped by a key-wrapping key need nothing: theirs is re-wrapped."""
        primary, rewrapped, current, vanished = self.kek.primary_version(), 0, 0, 0
        for batch in self._scan_wrapped_keys():
            stale = {k: w for k, w in batch if wrapped_by_kek(w) and kek_version_of(w) != primary}
            current += len(batch) - len(stale)
            fresh = {k: self.kek.wrap(self.kek.unwrap(w, k.encode()), k.encode()) for k, w in stale.items()}
            replaced = self._replace_wrapped_keys(fresh)
            rewrapped, vanished = rewrapped + replaced, vanished + len(fresh) - replaced
        return RewrapCounts(rewrapped, current, vanished)

    def sweep_orphans(self, grace_seconds: float = ORPHAN_GRACE_SECONDS) -> int:
        """Deletes the data keys nothing points to any more (a worker that died between writing a
        key and claiming its subject leaves one; so does a forget interrupted halfway, which this
        finishes). A key younger than ``grace_seconds`` is left alone: its claim may be under way.
        Returns how many keys it deleted."""
        return self._sweep_orphans(grace_seconds)

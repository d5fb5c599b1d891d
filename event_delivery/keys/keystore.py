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
  key-wrapping keys) names a data key by purpose;
- a *pending forget*, keyed by the unscoped pseudonym, lists the subject's pseudonyms in the
  scopes while its forget runs, so that the sweep can finish a forget that stopped.

Two tiers of wrapping keep the key-encryption key (Cloud KMS) off the hot path. The KEK
wraps only *key-wrapping keys*: one random 256-bit key per calendar month (UTC), stored as
the named key ``key-wrapping/<YYYY-MM>`` (``wrapping.py``). Those wrap every other key here,
in the process: ``0x02 || key-wrapping key id (16 bytes) || nonce || AES-256-GCM``, with the
header and the key id as associated data. A process unwraps each key-wrapping key with one
KEK call and keeps it until a rotation deletes it, which it checks every
``KEY_WRAPPING_MEMORY_SECONDS`` with one keystore read and no KMS call: no data key costs a KMS
call, whether created or read, and a KMS outage fails no key the process holds.

A rotation (``rewrap``) revokes every copy of the keystore taken before it: it makes new
key-wrapping keys, re-wraps every data key under them, and only then deletes the old ones.
Once the KEK versions that wrapped the old ones are destroyed, nothing unwraps an old copy.
Rotations run one at a time: each holds a lease (a named entry claimed with an expiry, renewed
at every batch), and re-wraps a key only if it still holds what the rotation read.

``forget`` records its work, writes the unscoped tombstone, then deletes the subject's key in
every scope that exists (the scopes are the pseudonym secrets stored, so a type removed from
the registry is found too) and leaves a tombstone in each. From the unscoped tombstone on, no
key of the subject is served or made by subject, in any type; a forget that stops is finished
by running it again or by the sweep. Two workers that meet a new subject at once end up with
one key: the first subject entry written wins, atomically, and the loser's key is deleted.

Backends: SQLite (embedded, the default for local runs) and Cloud Bigtable
(production; tested against the Bigtable emulator).
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.hmac import HMAC

from event_delivery.keys.kek import (
    KeyEncryptionKey,
)
from event_delivery.keys.rotation import KeyRotation
from event_delivery.keys.wrapped_keys import KeyWrappingTier
from event_delivery.keys.wrapping import (
    NewKey,
)

PSEUDONYM_KEY = "subject-pseudonyms"  # the unscoped pseudonyms: tombstones, and keys from before scopes
SCOPED_PSEUDONYM_KEY = PSEUDONYM_KEY + "/{scope}"
SCAN_BATCH = 500
ORPHAN_GRACE_SECONDS = 3600


@dataclasses.dataclass(frozen=True)
class SubjectKey:
    key_id: str
    data_key: bytes = dataclasses.field(repr=False)

    @property
    def aead(self) -> AESGCM:
        return AESGCM(self.data_key)


class Keystore(KeyWrappingTier, KeyRotation, abc.ABC):
    """Subject keys, wrapped by a key-encryption key, in some backend."""

    def __init__(self, kek: KeyEncryptionKey, clock: Callable[[], float] = time.time):
        self.kek = kek
        self.clock = clock
        self._pseudonym_macs: dict[str, HMAC] = {}  # by the secret's name; a secret never changes
        self._hold_no_key_wrapping_keys()

    # Backend primitives. Each call takes a batch, to keep round trips per bundle.
    @abc.abstractmethod
    def _read_subjects(self, pseudonyms: list[str]) -> dict[str, str | None]:
        """Known subjects: pseudonym -> key id, or None for a tombstone."""

    @abc.abstractmethod
    def _create_subjects(self, new: dict[str, NewKey]) -> None:
        """Stores ``pseudonym -> new key`` where no entry exists yet; first writer wins. Stores none
        and raises ``KeyWrappingReplaced`` unless their key-wrapping key is still the newest
        (``wrapping.check_still_newest``), checked where a rotation's scan would see them."""

    @abc.abstractmethod
    def _read_wrapped_keys(self, key_ids: list[str]) -> dict[str, bytes]:
        """Wrapped data keys that still exist."""

    @abc.abstractmethod
    def _forget(self, pseudonym: str) -> bool:
        """Deletes the subject's data key and leaves a tombstone; True if it had a key."""

    @abc.abstractmethod
    def _record_forget(self, pseudonym: str, scoped: list[str]) -> None:
        """Records a forget under way: the subject's unscoped pseudonym and those in the scopes."""

    @abc.abstractmethod
    def _pending_forgets(self) -> dict[str, list[str]]:
        """The forgets recorded and not done: unscoped pseudonym -> pseudonyms in the scopes."""

    @abc.abstractmethod
    def _forget_done(self, pseudonym: str) -> None:
        """Deletes the record of a forget whose every key is deleted."""

    @abc.abstractmethod
    def _named_key_id(self, name: str, candidate: Callable[[], NewKey]) -> str:
        """The key id stored under ``name``; if there is none, stores ``candidate()`` first (and only
        then makes it), or raises ``KeyWrappingReplaced`` as ``_create_subjects`` does."""

    @abc.abstractmethod
    def _named_keys(self, prefix: str) -> dict[str, str]:
        """Every named key whose name starts with ``prefix``: name -> key id."""

    @abc.abstractmethod
    def _delete_named_key(self, name: str, key_id: str) -> None:
        """Deletes the data key, then the name that points to it (a retry after a failure finishes)."""

    @abc.abstractmethod
    def _sweep_orphans(self, grace_seconds: float) -> int:
        """Deletes data keys that no subject or named entry points to and that are older than
        ``grace_seconds``; finishes interrupted forgets. Returns how many keys it deleted."""

    @abc.abstractmethod
    def holds_subjects(self) -> bool:
        """Whether any subject (or tombstone) is stored: a keystore that jobs have used holds some,
        one that was only provisioned holds none."""

    @abc.abstractmethod
    def _purge_deleted(self) -> None:
        """Removes from the backend's own files what its deletions left there (SQLite: its log)."""

    def check(self) -> None:
        """Raises ``KeysNotFound`` unless the keystore exists (what provisioning creates): a first read does."""
        self.holds_subjects()

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

    def _scoped_pseudonyms(self, subject_id: str) -> list[str]:
        """The subject's pseudonyms in every scope whose secret is stored (one per type ever used)."""
        return [self._pseudonym(n, subject_id) for n in sorted(self.named_keys(SCOPED_PSEUDONYM_KEY.format(scope="")))]

    def subject_key_ids(self, subject_ids, create: bool = True, scope: str | None = None) -> dict[str, str | None]:
        """Key ids for many subjects in ``scope`` (an event type's name; None: the unscoped keys of
        keystores from before scopes), in one batch; None for forgotten (or, without ``create``,
        unknown) ones.

        The unscoped tombstone decides: a subject that has it gets None, even where a forget that
        stopped halfway left its key in the scope, and no new key. It is read in the same batch,
        after the scope's secret exists (made by the first ``pseudonym`` of the scope), and forget
        writes it before it lists the secrets: so either this read sees the tombstone, or forget
        sees the scope and tombstones the subject there, where a claim made now loses or is erased.
        """
        subjects = set(subject_ids)
        by_pseudonym = {self.pseudonym(s, scope): s for s in subjects}
        tombstones = {} if scope is None else {self.pseudonym(s): s for s in subjects}
        known = self._read_subjects([*by_pseudonym, *tombstones])
        forgotten = {s for p, s in tombstones.items() if p in known and known[p] is None}
        missing = [p for p, s in by_pseudonym.items() if p not in known and s not in forgotten]
        if missing and create:
            self._stored(lambda: self._create_subjects({pseudonym: self._new_key() for pseudonym in missing}))
            known.update(self._read_subjects(missing))
        return {s: None if s in forgotten else known.get(p) for p, s in by_pseudonym.items()}

    def subject_keys(self, subject_ids, create: bool = True, scope: str | None = None) -> dict[str, SubjectKey | None]:
        """Keys for many subjects in ``scope``, in one batch; None for forgotten (or, without
        ``create``, unknown) ones."""
        key_ids = self.subject_key_ids(subject_ids, create, scope)
        keys = self.data_keys([k for k in key_ids.values() if k])
        return {s: SubjectKey(k, keys[k]) if k and keys.get(k) else None for s, k in key_ids.items()}

    def key_ids_of(self, subject_id: str) -> list[str]:
        """The subject's key ids still stored in every scope, the unscoped one included; creates nothing."""
        pseudonyms = [self.pseudonym(subject_id), *self._scoped_pseudonyms(subject_id)]
        return sorted(k for k in self._read_subjects(pseudonyms).values() if k)

    def data_keys(self, key_ids) -> dict[str, bytes | None]:
        """Unwrapped data keys by key id; None where the key was deleted (its subject forgotten)."""
        wanted = sorted(set(key_ids))
        wrapped = self._read_wrapped_keys(wanted)
        return {k: self._unwrap_key(k, wrapped[k]) if k in wrapped else None for k in wanted}

    def forget(self, subject_id: str) -> bool:
        """Crypto-shreds a subject in every scope: True if a key was deleted, False if there was none
        (tombstones stay).

        Its steps: record the work (the subject's pseudonyms in the scopes), write the unscoped
        tombstone (from here on no key of the subject is served or made by subject), list the
        scopes again and record a scope made meanwhile, delete the key and leave a tombstone in
        each scope, drop the record, and purge what the deletions left in the backend's files.
        Only then is the forget complete. One that stops after any step is finished by running it
        again, or by the sweep (``sweep_orphans``), which finds the record."""
        unscoped, scoped = self.pseudonym(subject_id), self._scoped_pseudonyms(subject_id)
        self._record_forget(unscoped, scoped)
        deleted = self._forget(unscoped)
        later = self._scoped_pseudonyms(subject_id)  # a job that made a scope before the tombstone
        if later != scoped:
            self._record_forget(unscoped, later)
        for pseudonym in later:
            deleted = self._forget(pseudonym) or deleted
        self._forget_done(unscoped)
        self._purge_deleted()
        return deleted

    def named_key(self, name: str) -> SubjectKey:
        """A key kept for a purpose rather than a subject, created on first use (and only then wrapped)."""
        stored_id = self._stored(lambda: self._named_key_id(name, self._new_key))
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

    def sweep_orphans(self, grace_seconds: float = ORPHAN_GRACE_SECONDS) -> int:
        """Finishes the forgets that stopped (their record lists the subject's pseudonyms), then
        deletes the data keys nothing points to any more (a worker that died between writing a key
        and claiming its subject leaves one). A key younger than ``grace_seconds`` is left alone:
        its claim may be under way. Returns how many keys it deleted."""
        finished = 0
        for unscoped, scoped in self._pending_forgets().items():
            for pseudonym in [unscoped, *scoped]:
                finished += self._forget(pseudonym)
            self._forget_done(unscoped)
        swept = self._sweep_orphans(grace_seconds)
        self._purge_deleted()
        return finished + swept

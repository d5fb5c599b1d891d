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
import collections
import dataclasses
import math
import secrets
import struct
import threading
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
from event_delivery.keys.wrapping import (
    KEY_WRAPPING_KEYS,
    WRAPPED_LOCALLY,
    KeyWrapping,
    KeyWrappingReplaced,
    NewKey,
    generation_name,
    generation_of,
    key_wrapping_period,
    newest_generation,
    wrapping_key_id_of,
)

PSEUDONYM_KEY = "subject-pseudonyms"  # the unscoped pseudonyms: tombstones, and keys from before scopes
SCOPED_PSEUDONYM_KEY = PSEUDONYM_KEY + "/{scope}"
LOCAL_HEADER = struct.Struct(">B16s")  # format, the key-wrapping key's id
SCAN_BATCH = 500
ORPHAN_GRACE_SECONDS = 3600
KEY_WRAPPING_MEMORY_SECONDS = 3600  # how often a process checks that the key-wrapping keys it holds still exist
KEY_WRAPPING_RETRY_SECONDS = 60  # how soon a check that failed is tried again
STORE_ATTEMPTS = 3  # a key wrapped under a key-wrapping key a rotation replaced is wrapped again
REWRAP_LEASE = "rewrap"  # the lease a rotation holds
REWRAP_LEASE_SECONDS = 600  # renewed at every batch; a rotation that died frees it after this


class RotationUnderWay(RuntimeError):
    """Another rotation holds the lease: two at once could re-wrap a key under a key-wrapping key
    the other deletes."""


@dataclasses.dataclass(frozen=True)
class SubjectKey:
    key_id: str
    data_key: bytes = dataclasses.field(repr=False)

    @property
    def aead(self) -> AESGCM:
        return AESGCM(self.data_key)


@dataclasses.dataclass(frozen=True)
class RewrapCounts:
    rewrapped: int = 0  # keys wrapped anew: under a new key-wrapping key, or the KEK's primary version
    retired: int = 0  # key-wrapping keys replaced by new ones and deleted
    vanished: int = 0  # deleted (forgotten) between the read and the re-wrap
    unreadable: int = 0  # under a key-wrapping key or KEK version that is gone: nothing can read them


def new_key_id() -> str:
    """A random, opaque key id: it says nothing about its subject."""
    return secrets.token_hex(16)


class Keystore(abc.ABC):
    """Subject keys, wrapped by a key-encryption key, in some backend."""

    def __init__(self, kek: KeyEncryptionKey, clock: Callable[[], float] = time.time):
        self.kek = kek
        self.clock = clock
        self._pseudonym_macs: dict[str, HMAC] = {}  # by the secret's name; a secret never changes
        self._key_wrapping_keys: dict[str, AESGCM] = {}  # by key id
        self._next_check_at = math.inf  # when to check that those still exist
        self._checking = threading.Lock()  # one thread of the process checks
        self._current_key_wrapping_key: KeyWrapping | None = None

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
    def _scan_wrapped_keys(self) -> Iterator[list[tuple[str, bytes]]]:
        """Every stored ``(key id, wrapped key)``, in batches."""

    @abc.abstractmethod
    def _replace_wrapped_keys(self, rewrapped: dict[str, tuple[bytes, bytes]]) -> int:
        """``key id -> (wrapped as read, wrapped anew)``: stores each new wrapping only where the key
        still holds the one read (compare-and-set: a deleted key stays deleted, and a key another
        writer wrapped meanwhile keeps that); returns how many it replaced."""

    @abc.abstractmethod
    def _take_lease(self, name: str, holder: str, now: float, until: float) -> bool:
        """Claims, or renews, the lease ``name`` for ``holder`` until ``until``, atomically; False,
        writing nothing, while another holder's lease is live at ``now``."""

    @abc.abstractmethod
    def _release_lease(self, name: str, holder: str) -> None:
        """Deletes the lease ``name`` if ``holder`` holds it."""

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

    # How a key is stored: wrapped by its month's newest key-wrapping key, which the KEK wraps; bound to its key id.
    def _wrap_key(self, key_id: str, data_key: bytes, wrapping: KeyWrapping | None = None) -> bytes:
        wrapping = wrapping or self._current_wrapping()
        header = LOCAL_HEADER.pack(WRAPPED_LOCALLY, bytes.fromhex(wrapping.key_id))
        nonce = secrets.token_bytes(NONCE_BYTES)
        aead = self._key_wrapping_key(wrapping.key_id)
        return header + nonce + aead.encrypt(nonce, data_key, header + key_id.encode())

    def _unwrap_key(self, key_id: str, wrapped: bytes) -> bytes:
        if wrapped_by_kek(wrapped):  # a key-wrapping key (or a data key stored before there were any)
            return self.kek.unwrap(wrapped, key_id.encode())
        if len(wrapped) < LOCAL_HEADER.size or wrapped[0] != WRAPPED_LOCALLY:
            return self.kek.unwrap(wrapped, key_id.encode())  # which names the unknown format
        header, body = wrapped[: LOCAL_HEADER.size], wrapped[LOCAL_HEADER.size :]
        aead = self._key_wrapping_key(header[1:].hex())
        return aead.decrypt(body[:NONCE_BYTES], body[NONCE_BYTES:], header + key_id.encode())

    def _new_key(self) -> NewKey:
        wrapping, key_id = self._current_wrapping(), new_key_id()
        try:
            wrapped = self._wrap_key(key_id, secrets.token_bytes(KEY_BYTES), wrapping)
        except KeysNotFound as gone:
            if wrapping.is_newest(self._named_keys(wrapping.names)):
                raise  # still the newest, yet unusable (its KEK version destroyed): no retry mends that
            raise KeyWrappingReplaced(str(gone)) from None  # a rotation replaced it since this process read
        return NewKey(key_id, wrapped, wrapping)

    def _new_key_wrapping_key(self) -> NewKey:
        key_id, key = new_key_id(), secrets.token_bytes(KEY_BYTES)
        wrapped = self.kek.wrap(key, key_id.encode())
        self._remember_key_wrapping_key(key_id, AESGCM(key))  # if another process's wins, never asked for
        return NewKey(key_id, wrapped)

    def _current_wrapping(self) -> KeyWrapping:
        """This month's newest key-wrapping key, made by the first process that needs it (one KEK call
        a month); kept until the month ends or a rotation replaces it."""
        period = key_wrapping_period(self.clock())
        current = self._current_key_wrapping_key
        if current is None or current.period != period:
            newest = newest_generation(self._named_keys(generation_name(period, 0)))
            key_id = newest[1] if newest else self._named_key_id(generation_name(period, 0), self._new_key_wrapping_key)
            self._current_key_wrapping_key = current = KeyWrapping(period, key_id)
        return current

    def _stored(self, store: Callable[[], object]):
        """``store()``, again with keys wrapped afresh while a rotation replaces the key-wrapping key."""
        for attempt in range(STORE_ATTEMPTS):
            try:
                return store()
            except KeyWrappingReplaced:
                if attempt + 1 == STORE_ATTEMPTS:
                    raise
                self._current_key_wrapping_key = None

    def _remember_key_wrapping_key(self, key_id: str, aead: AESGCM) -> AESGCM:
        self._key_wrapping_keys[key_id] = aead
        if self._next_check_at == math.inf:
            self._next_check_at = self.clock() + KEY_WRAPPING_MEMORY_SECONDS
        return aead

    def _key_wrapping_key(self, key_id: str) -> AESGCM:
        """A key-wrapping key, unwrapped by the KEK unless this process holds it. It holds it until
        a check, every ``KEY_WRAPPING_MEMORY_SECONDS`` (one comparison a call until then), finds
        that a rotation deleted it, so a worker does not keep one that a rotation deleted."""
        if self.clock() >= self._next_check_at:
            self._check_key_wrapping_keys()
        held = self._key_wrapping_keys.get(key_id)
        if held:
            return held
        wrapped = self._read_wrapped_keys([key_id]).get(key_id)
        if wrapped is None:
            raise KeysNotFound(f"the key-wrapping key {key_id} is not in the keystore")
        return self._remember_key_wrapping_key(key_id, AESGCM(self.kek.unwrap(wrapped, key_id.encode())))

    def _check_key_wrapping_keys(self) -> None:
        """Drops the held key-wrapping keys that a rotation deleted: one keystore read, no KMS call,
        by one thread of the process while the others go on with what is held. A read that fails
        drops nothing and is tried again ``KEY_WRAPPING_RETRY_SECONDS`` later, so an outage takes
        no key away. A key another thread unwraps during the check may be dropped: it is unwrapped
        again when needed."""
        if not self._checking.acquire(blocking=False):
            return
        try:
            now = self.clock()
            if now < self._next_check_at:
                return  # another thread has just checked
            try:
                stored = self._read_wrapped_keys(list(self._key_wrapping_keys))
            except Exception:  # whatever the keystore's outage raises: keep what is held
                self._next_check_at = now + KEY_WRAPPING_RETRY_SECONDS
                return
            self._key_wrapping_keys = {k: aead for k, aead in self._key_wrapping_keys.items() if k in stored}
            self._next_check_at = now + KEY_WRAPPING_MEMORY_SECONDS
        finally:
            self._checking.release()

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

    def _forgotten(self, subject_ids) -> set[str]:
        """The subjects among ``subject_ids`` that have the unscoped tombstone, in one batch."""
        by_pseudonym = {self.pseudonym(s): s for s in set(subject_ids)}
        known = self._read_subjects(list(by_pseudonym))
        return {s for p, s in by_pseudonym.items() if p in known and known[p] is None}

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

    def is_forgotten(self, subject_id: str) -> bool:
        """Whether the subject has the unscoped tombstone that forget writes first."""
        return subject_id in self._forgotten([subject_id])

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
        """Rotates the key-wrapping keys, which revokes every copy of the keystore taken before.

        It makes a new generation of every month's key-wrapping key (wrapped by the KEK's primary
        version), re-wraps every data key under its month's new one (and every key the KEK wraps
        under an older version, under the primary), scanning again until a scan finds none left,
        and only then deletes the old key-wrapping keys. A copy taken before holds its data keys
        under those, wrapped by the KEK versions of then: once those versions are destroyed,
        nothing unwraps it. Safe beside running jobs and forget: a job stores no key under a
        replaced key-wrapping key (``_create_subjects``), and a key deleted meanwhile stays
        deleted. A run that stops leaves every key readable, and a run again finishes (each run
        replaces whatever key-wrapping keys it finds). One at a time: a second run while one holds
        the lease raises ``RotationUnderWay``."""
        holder = new_key_id()
        self._hold_rewrap_lease(holder)
        try:
            return self._rotate(holder)
        finally:
            self._release_lease(REWRAP_LEASE, holder)

    def _hold_rewrap_lease(self, holder: str) -> None:
        now = self.clock()
        if not self._take_lease(REWRAP_LEASE, holder, now, now + REWRAP_LEASE_SECONDS):
            raise RotationUnderWay(
                "another rotation (rewrap) is under way, and rotations run one at a time; if it died, "
                f"its lease lapses within {REWRAP_LEASE_SECONDS} s: run again then"
            )

    def _rotate(self, holder: str) -> RewrapCounts:
        retiring = self.named_keys(KEY_WRAPPING_KEYS)
        newer = {
            period: self._newer_key_wrapping_key(period, set(retiring.values()))
            for period in {generation_of(name)[0] for name in retiring}
        }
        replacements = {key_id: newer[generation_of(name)[0]] for name, key_id in retiring.items()}
        self._current_key_wrapping_key = None
        totals = collections.Counter()
        while True:
            found = self._rewrap_pass(replacements, holder)
            totals.update(rewrapped=found["rewrapped"], vanished=found["vanished"])
            if not found["stale"]:
                break
        self.delete_named_keys(retiring)
        for key_id in retiring.values():
            self._key_wrapping_keys.pop(key_id, None)
        return RewrapCounts(totals["rewrapped"], len(retiring), totals["vanished"], found["unreadable"])

    def _newer_key_wrapping_key(self, period: str, retiring: set[str]) -> KeyWrapping:
        """A generation of the month's key-wrapping key newer than every one in ``retiring``."""
        names = self._named_keys(generation_name(period, 0))
        name, key_id = newest_generation(names)
        if key_id in retiring:
            newer = generation_name(period, generation_of(name)[1] + 1)
            key_id = self._named_key_id(newer, self._new_key_wrapping_key)  # another rotation's, if it came first
        return KeyWrapping(period, key_id)

    def _rewrap_pass(self, replacements: dict[str, KeyWrapping], holder: str) -> collections.Counter:
        """One scan: every key still under a replaced key-wrapping key, or under an older KEK version
        than the primary, is wrapped anew; the lease is renewed at every batch."""
        primary, found = self.kek.primary_version(), collections.Counter()
        for batch in self._scan_wrapped_keys():
            self._hold_rewrap_lease(holder)
            fresh = {}
            for key_id, wrapped in batch:
                old = wrapping_key_id_of(wrapped)
                stale_kek = wrapped_by_kek(wrapped) and kek_version_of(wrapped) != primary
                if key_id in replacements or not (old in replacements or stale_kek):
                    continue  # a key-wrapping key to delete, or a key that needs nothing
                try:
                    data_key = self._unwrap_key(key_id, wrapped)
                except KeysNotFound:  # its key-wrapping key or KEK version is gone: nothing can read it
                    found["unreadable"] += 1
                    continue
                found["stale"] += 1
                if old in replacements:
                    fresh[key_id] = (wrapped, self._wrap_key(key_id, data_key, replacements[old]))
                else:
                    fresh[key_id] = (wrapped, self.kek.wrap(data_key, key_id.encode()))
            replaced = self._replace_wrapped_keys(fresh)
            found.update(rewrapped=replaced, vanished=len(fresh) - replaced)
        return found

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

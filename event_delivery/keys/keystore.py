"""The subject keystore: one random data key per data subject, stored only wrapped.

Layout, the same in every backend:

- a *subject* entry, keyed by the subject's pseudonym (a keyed HMAC of its id, so the
  keystore holds no subject id in clear), names the subject's key id, or is a
  tombstone once the subject is forgotten;
- a *data key* entry, keyed by the opaque key id, holds the data key wrapped by the
  key-encryption key (with the key id as associated data);
- a *named key* entry (the pseudonym secret, the dead-letter quarantine keys) names
  a data key by purpose.

``forget`` deletes the data key and turns the subject entry into a tombstone, so the
subject's ciphertexts can never be decrypted again, and no new key is ever created
for it. Two workers that meet a new subject at once end up with one key: the first
subject entry written wins, atomically, and the loser's key is deleted.

Backends: SQLite (embedded, the default for local runs) and Cloud Bigtable
(production; tested against the Bigtable emulator).
"""

from __future__ import annotations

import abc
import dataclasses
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.hmac import HMAC

from event_delivery.keys.kek import KEY_BYTES, KeyEncryptionKey

PSEUDONYM_KEY = "subject-pseudonyms"


@dataclasses.dataclass(frozen=True)
class SubjectKey:
    key_id: str
    data_key: bytes = dataclasses.field(repr=False)

    @property
    def aead(self) -> AESGCM:
        return AESGCM(self.data_key)


def new_key_id() -> str:
    """A random, opaque key id: it says nothing about its subject."""
    return secrets.token_hex(16)


class Keystore(abc.ABC):
    """Subject keys, wrapped by a key-encryption key, in some backend."""

    def __init__(self, kek: KeyEncryptionKey):
        self.kek = kek
        self._pseudonym_mac = None

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
    def _named_key_id(self, name: str, candidate: tuple[str, bytes]) -> str:
        """The key id stored under ``name``, storing ``candidate`` first if there is none."""

    @abc.abstractmethod
    def holds_keys(self) -> bool:
        """Whether any data key is stored: a keystore that jobs have used holds some."""

    # The interface the pipeline and the tools use.
    def pseudonym(self, subject_id: str) -> str:
        if self._pseudonym_mac is None:
            self._pseudonym_mac = HMAC(self.named_key(PSEUDONYM_KEY).data_key, SHA256())
        mac = self._pseudonym_mac.copy()  # the keyed state, without keying a new HMAC for every subject
        mac.update(subject_id.encode("utf-8"))
        return mac.finalize().hex()[:32]

    def subject_key_ids(self, subject_ids, create: bool = True) -> dict[str, str | None]:
        """Key ids for many subjects in one batch; None for forgotten (or, without ``create``, unknown) ones."""
        by_pseudonym = {self.pseudonym(s): s for s in set(subject_ids)}
        known = self._read_subjects(list(by_pseudonym))
        missing = [p for p in by_pseudonym if p not in known]
        if missing and create:
            fresh = {}
            for pseudonym in missing:
                key_id = new_key_id()
                fresh[pseudonym] = (key_id, self.kek.wrap(secrets.token_bytes(KEY_BYTES), key_id.encode()))
            self._create_subjects(fresh)
            known.update(self._read_subjects(missing))
        return {subject: known.get(p) for p, subject in by_pseudonym.items()}

    def subject_keys(self, subject_ids, create: bool = True) -> dict[str, SubjectKey | None]:
        """Keys for many subjects in one batch; None for forgotten (or, without ``create``, unknown) ones."""
        key_ids = self.subject_key_ids(subject_ids, create)
        keys = self.data_keys([k for k in key_ids.values() if k])
        return {s: SubjectKey(k, keys[k]) if k and keys.get(k) else None for s, k in key_ids.items()}

    def data_keys(self, key_ids) -> dict[str, bytes | None]:
        """Unwrapped data keys by key id; None where the key was deleted (its subject forgotten)."""
        wanted = sorted(set(key_ids))
        wrapped = self._read_wrapped_keys(wanted)
        return {k: self.kek.unwrap(wrapped[k], k.encode()) if k in wrapped else None for k in wanted}

    def forget(self, subject_id: str) -> bool:
        """Crypto-shreds a subject: True if a key was deleted, False if there was none (a tombstone stays)."""
        return self._forget(self.pseudonym(subject_id))

    def is_forgotten(self, subject_id: str) -> bool:
        pseudonym = self.pseudonym(subject_id)
        known = self._read_subjects([pseudonym])
        return pseudonym in known and known[pseudonym] is None

    def named_key(self, name: str) -> SubjectKey:
        """A key kept for a purpose rather than a subject, created on first use."""
        key_id = new_key_id()
        candidate = (key_id, self.kek.wrap(secrets.token_bytes(KEY_BYTES), key_id.encode()))
        stored_id = self._named_key_id(name, candidate)
        return SubjectKey(stored_id, self.data_keys([stored_id])[stored_id])

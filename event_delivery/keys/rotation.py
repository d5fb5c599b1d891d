"""Rotation of the key-wrapping keys (``make rewrap``), which revokes every copy of the keystore
taken before it: new key-wrapping keys, every data key re-wrapped under them, then the old ones
deleted. A mixin of ``Keystore``: the backends provide the scan, the compare-and-set and the lease.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import secrets
from collections.abc import Iterator

from event_delivery.keys.kek import KeysNotFound, kek_version_of, wrapped_by_kek
from event_delivery.keys.wrapping import (
    KEY_WRAPPING_KEYS,
    KeyWrapping,
    generation_name,
    generation_of,
    newest_generation,
    wrapping_key_id_of,
)

REWRAP_LEASE = "rewrap"  # the lease a rotation holds
REWRAP_LEASE_SECONDS = 600  # renewed at every batch; a rotation that died frees it after this


class RotationUnderWay(RuntimeError):
    """Another rotation holds the lease: two at once could re-wrap a key under a key-wrapping key
    the other deletes."""


@dataclasses.dataclass(frozen=True)
class RewrapCounts:
    rewrapped: int = 0  # keys wrapped anew: under a new key-wrapping key, or the KEK's primary version
    retired: int = 0  # key-wrapping keys replaced by new ones and deleted
    vanished: int = 0  # deleted (forgotten) between the read and the re-wrap
    unreadable: int = 0  # under a key-wrapping key or KEK version that is gone: nothing can read them


class KeyRotation(abc.ABC):
    """``rewrap`` and what it needs of a backend."""

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
        holder = secrets.token_hex(16)
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

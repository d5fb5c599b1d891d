"""A worker's key cache: what bounds how long a forgotten key can still be used."""

from __future__ import annotations

import collections
import threading
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from event_delivery.keys.keystore import Keystore, SubjectKey

MAX_ENTRIES = 1_000_000  # entries a worker's cache holds at most (both maps), whatever the rate and the TTL


class KeyCache:
    """A worker's cache of one scope's keys (an event type's: a job serves one), with a TTL:
    subject -> key id, and key id -> data key.

    A step that unseals by key id (replaying the archive) fills the second map, so a
    step that then seals by subject only asks the keystore which key id a subject has.

    The TTL is the upper bound on how long a worker may keep using a key after its
    subject was forgotten: both maps expire. Events encrypted in that window are
    unreadable anyway, because the key they used is gone. An expired entry also leaves
    the worker's memory at the cache's next use, so a forgotten key is not kept there.
    Past ``MAX_ENTRIES`` the oldest entries leave too, expired or not (a refetch).
    """

    def __init__(self, keystore: Keystore, scope: str, ttl_seconds: float, clock=time.monotonic):
        self.keystore = keystore
        self.scope = scope
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self._key_ids: dict[str, tuple[float, str | None]] = {}  # subject -> (expires, key id)
        self._keys: dict[str, tuple[float, tuple]] = {}  # key id -> (expires, (key, aead))
        self._named: dict[str, tuple[SubjectKey, AESGCM]] = {}  # name -> (key, aead), for the worker's life
        # (expires, map, item) as entries were stored: every entry lives one TTL, so this is expiry order.
        self._expiring: collections.deque[tuple[float, dict, str]] = collections.deque()
        self._evicting = threading.Lock()

    def _cached(self, entries: dict, wanted, fetch) -> dict:
        """Fresh entries of ``wanted``; the rest from one ``fetch(missing)``, stored until the TTL."""
        now = self.clock()
        self._evict(now)
        found, missing = {}, []
        for item in set(wanted):
            entry = entries.get(item)
            if entry and entry[0] > now:
                found[item] = entry[1]
            else:
                missing.append(item)
        if missing:
            expires = now + self.ttl_seconds
            for item, value in fetch(missing).items():
                found[item] = value
                entries[item] = (expires, value)
                self._expiring.append((expires, entries, item))
            self._evict(now)
        return found

    def _evict(self, now: float) -> None:
        """Drops the entries whose TTL has passed, and the oldest past ``MAX_ENTRIES``, oldest first
        (every entry has one queue item, so the queue's length bounds both maps); a call with none
        to drop looks at one queue item only. Steps in other threads may store entries meanwhile:
        one stored again since it was queued has a later expiry and stays (a race that drops it
        costs a refetch), and one may empty the queue between the length and the head read."""
        queue = self._expiring
        try:
            if queue[0][0] > now and len(queue) <= MAX_ENTRIES:
                return
        except IndexError:  # empty, or emptied by another thread's eviction
            return
        with self._evicting:
            while queue and (queue[0][0] <= now or len(queue) > MAX_ENTRIES):
                expires, entries, item = queue.popleft()
                entry = entries.get(item)
                if entry is not None and entry[0] <= expires:
                    entries.pop(item, None)

    def _fetch_data_keys(self, key_ids: list[str]) -> dict[str, tuple[SubjectKey | None, AESGCM | None]]:
        fetched = {}
        for key_id, data_key in self.keystore.data_keys(key_ids).items():
            key = SubjectKey(key_id, data_key) if data_key else None
            fetched[key_id] = (key, key.aead if key else None)
        return fetched

    def _fetch_key_ids(self, subject_ids: list[str]) -> dict[str, str | None]:
        return self.keystore.subject_key_ids(subject_ids, scope=self.scope)

    def data_keys(self, key_ids) -> dict[str, tuple[SubjectKey | None, AESGCM | None]]:
        """Keys by key id, as ``(key, aead)``, ``(None, None)`` where the key is gone; misses cost one batch."""
        return self._cached(self._keys, key_ids, self._fetch_data_keys)

    def named_key(self, name: str) -> tuple[SubjectKey, AESGCM]:
        """A named key (a day's quarantine key), as ``(key, aead)``, read from the keystore once per
        worker: a name always means the same key, and only a key past its use is ever deleted."""
        entry = self._named.get(name)
        if entry is None:
            key = self.keystore.named_key(name)
            entry = self._named[name] = (key, key.aead)
        return entry

    def lookup(self, subject_ids) -> dict[str, tuple[SubjectKey | None, AESGCM | None]]:
        """The scope's keys for a batch of subjects, created for new ones, ``(None, None)`` for forgotten ones."""
        key_ids = self._cached(self._key_ids, subject_ids, self._fetch_key_ids)
        keys = self.data_keys(k for k in key_ids.values() if k)
        return {subject: keys[k] if k else (None, None) for subject, k in key_ids.items()}

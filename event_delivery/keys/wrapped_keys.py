"""How the keystore stores a key: wrapped by its month's newest key-wrapping key, which the KEK
wraps, and bound to its key id (``0x02 || key-wrapping key id || nonce || AES-256-GCM``). A
process unwraps each key-wrapping key with one KEK call and holds it until a rotation deletes
it, which one of its threads checks every ``KEY_WRAPPING_MEMORY_SECONDS`` with one keystore
read and no KMS call. A mixin of ``Keystore``, whose backends read and name the keys.
"""

from __future__ import annotations

import math
import secrets
import struct
import threading
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from event_delivery.keys.kek import KEY_BYTES, NONCE_BYTES, KeysNotFound, wrapped_by_kek
from event_delivery.keys.wrapping import (
    WRAPPED_LOCALLY,
    KeyWrapping,
    KeyWrappingReplaced,
    NewKey,
    generation_name,
    key_wrapping_period,
    newest_generation,
)

LOCAL_HEADER = struct.Struct(">B16s")  # format, the key-wrapping key's id
KEY_WRAPPING_MEMORY_SECONDS = 3600  # how often a process checks that the key-wrapping keys it holds still exist
KEY_WRAPPING_RETRY_SECONDS = 60  # how soon a check that failed is tried again
STORE_ATTEMPTS = 3  # a key wrapped under a key-wrapping key a rotation replaced is wrapped again


def new_key_id() -> str:
    """A random, opaque key id: it says nothing about its subject."""
    return secrets.token_hex(16)


class KeyWrappingTier:
    """Wraps and unwraps keys under the key-wrapping keys; needs ``kek``, ``clock``,
    ``_read_wrapped_keys``, ``_named_keys`` and ``_named_key_id`` of its ``Keystore``."""

    def _hold_no_key_wrapping_keys(self) -> None:
        self._key_wrapping_keys: dict[str, AESGCM] = {}  # by key id
        self._next_check_at = math.inf  # when to check that those still exist
        self._checking = threading.Lock()  # one thread of the process checks
        self._current_key_wrapping_key: KeyWrapping | None = None

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

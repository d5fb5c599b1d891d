"""Personal-field encryption: AES-256-GCM per value, bound to (event type, field, key id, event id).

A value is serialized as JSON (so numbers stay numbers), encrypted under its
subject's data key with a fresh 96-bit nonce, and stored as
``format || nonce || ciphertext``. The associated data names the format, the event
type, the field, the key id and the event id, so a ciphertext moved to another
field, type, subject or event fails to decrypt instead of decrypting to a plausible
wrong value. Raw payloads (dead letters, the archive) are sealed with
``encrypt_bytes``, bound to (event type, field, key id).
"""

from __future__ import annotations

import json
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
SEPARATOR = b"\x1f"
FIELD_FORMAT = 1  # the first byte of every encrypted field value


class UndecryptableField(ValueError):
    """A ciphertext that does not belong to this (type, field, key id), or was altered."""


def associated_data(event_type: str, field: str, key_id: str) -> bytes:
    return SEPARATOR.join(part.encode("utf-8") for part in (event_type, field, key_id))


def encrypt_bytes(aead: AESGCM, plaintext: bytes, event_type: str, field: str, key_id: str) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + aead.encrypt(nonce, plaintext, associated_data(event_type, field, key_id))


def decrypt_bytes(aead: AESGCM, ciphertext: bytes, event_type: str, field: str, key_id: str) -> bytes:
    try:
        return aead.decrypt(
            ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated_data(event_type, field, key_id)
        )
    except InvalidTag:
        raise UndecryptableField(f"field {field!r} does not decrypt under key {key_id}") from None


_FORMAT_BYTE = bytes([FIELD_FORMAT])
_VALUE_FORMAT = _FORMAT_BYTE + SEPARATOR


def _value_data(event_type: str, field: str, key_id: str, event_id: str | None) -> bytes:
    """(format, event type, field, key id, event id), each part after the first separated as in
    ``associated_data``; built in one go, as it is per value."""
    return _VALUE_FORMAT + f"{event_type}\x1f{field}\x1f{key_id}\x1f{event_id or ''}".encode()


_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # one encoder, not one per value


def encrypt_value(aead: AESGCM, value, event_type: str, field: str, key_id: str, event_id: str | None) -> bytes:
    plaintext = _to_json(value).encode("utf-8")
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = aead.encrypt(nonce, plaintext, _value_data(event_type, field, key_id, event_id))
    return _FORMAT_BYTE + nonce + sealed


def decrypt_value(aead: AESGCM, ciphertext: bytes, event_type: str, field: str, key_id: str, event_id: str | None):
    if not ciphertext or ciphertext[0] != FIELD_FORMAT:
        raise UndecryptableField(f"field {field!r} is not in a format this version reads")
    nonce, sealed = ciphertext[1 : 1 + NONCE_BYTES], ciphertext[1 + NONCE_BYTES :]
    try:
        plaintext = aead.decrypt(nonce, sealed, _value_data(event_type, field, key_id, event_id))
    except InvalidTag:
        raise UndecryptableField(f"field {field!r} does not decrypt under key {key_id}") from None
    return json.loads(plaintext)

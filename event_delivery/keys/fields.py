"""Personal-field encryption: AES-256-GCM per value, bound to (event type, field, key id).

A value is serialized as JSON (so numbers stay numbers), encrypted under its
subject's data key with a fresh 96-bit nonce, and stored as ``nonce || ciphertext``.
The associated data names the event type, the field and the key id, so a ciphertext
moved to another field, type or subject fails to decrypt instead of decrypting to
a plausible wrong value.
"""

from __future__ import annotations

import json
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
SEPARATOR = b"\x1f"


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


def encrypt_value(aead: AESGCM, value, event_type: str, field: str, key_id: str) -> bytes:
    plaintext = json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return encrypt_bytes(aead, plaintext, event_type, field, key_id)


def decrypt_value(aead: AESGCM, ciphertext: bytes, event_type: str, field: str, key_id: str):
    return json.loads(decrypt_bytes(aead, ciphertext, event_type, field, key_id))

"""Personal data sealed with AES-256-GCM, bound to (format, event type, field, key id, event id).

Two formats, named by a ciphertext's first byte, both stored as ``format || nonce || ciphertext``
with a fresh 96-bit nonce:

- ``FIELD_FORMAT``: one personal field's value, serialized as JSON (so numbers stay numbers);
- ``SEALED_FORMAT``: a message's bytes as they arrived (a dead letter's or an archived
  message's payload), whole.

The associated data names the format, the event type, the field (for a payload, the label
``envelope.SEALED_PAYLOAD`` or ``SEALED_RAW``), the key id and the event id, so a ciphertext
moved to another field, type, subject or event, or read as the other format, fails to decrypt
instead of decrypting to a plausible wrong value. A ciphertext of any other first byte is
refused, never misread: payloads sealed before the format byte and the event id were bound
(bare ``nonce || ciphertext``) are not read, as they could be swapped between records.
"""

from __future__ import annotations

import json
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
SEPARATOR = b"\x1f"
FIELD_FORMAT = 1  # the first byte of every encrypted field value
SEALED_FORMAT = 2  # the first byte of every sealed payload


class UndecryptableField(ValueError):
    """A ciphertext that does not belong to this (type, field, key id, event id), was altered, or is
    in a format this version does not read."""


_FIELD_BYTE, _SEALED_BYTE = bytes([FIELD_FORMAT]), bytes([SEALED_FORMAT])


def _bound_data(format_byte: bytes, event_type: str, field: str, key_id: str, event_id: str | None) -> bytes:
    """(format, event type, field, key id, event id), separated by ``SEPARATOR``; built in one go,
    as it is per value."""
    return format_byte + f"\x1f{event_type}\x1f{field}\x1f{key_id}\x1f{event_id or ''}".encode()


def _open(format_byte: bytes, aead: AESGCM, ciphertext: bytes, event_type, field, key_id, event_id) -> bytes:
    """The plaintext of a ``format_byte`` ciphertext, or ``UndecryptableField``."""
    if ciphertext[:1] != format_byte:
        raise UndecryptableField(f"field {field!r} is not in a format this version reads")
    nonce, sealed = ciphertext[1 : 1 + NONCE_BYTES], ciphertext[1 + NONCE_BYTES :]
    try:
        return aead.decrypt(nonce, sealed, _bound_data(format_byte, event_type, field, key_id, event_id))
    except InvalidTag:
        raise UndecryptableField(f"field {field!r} does not decrypt under key {key_id}") from None


def encrypt_bytes(aead: AESGCM, plaintext: bytes, event_type: str, field: str, key_id: str, event_id: str | None):
    """A payload sealed whole (``SEALED_FORMAT``), bound to its type, label, key id and event id."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    bound = _bound_data(_SEALED_BYTE, event_type, field, key_id, event_id)
    return _SEALED_BYTE + nonce + aead.encrypt(nonce, plaintext, bound)


def decrypt_bytes(aead: AESGCM, ciphertext: bytes, event_type: str, field: str, key_id: str, event_id: str | None):
    """The payload ``encrypt_bytes`` sealed with the same binding; ``UndecryptableField`` otherwise."""
    return _open(_SEALED_BYTE, aead, ciphertext, event_type, field, key_id, event_id)


_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # one encoder, not one per value


def encrypt_value(aead: AESGCM, value, event_type: str, field: str, key_id: str, event_id: str | None) -> bytes:
    """One field's value sealed (``FIELD_FORMAT``), bound to its type, field, key id and event id."""
    return _sealed_value(aead, secrets.token_bytes(NONCE_BYTES), value, event_type, field, key_id, event_id)


def _sealed_value(aead: AESGCM, nonce: bytes, value, event_type: str, field: str, key_id: str, event_id) -> bytes:
    plaintext = _to_json(value).encode("utf-8")
    bound = _bound_data(_FIELD_BYTE, event_type, field, key_id, event_id)
    return _FIELD_BYTE + nonce + aead.encrypt(nonce, plaintext, bound)


def encrypt_fields(aead: AESGCM, record: dict, names, event_type: str, key_id: str, event_id: str | None) -> dict:
    """The fields ``names`` of one record sealed at once: ``{name: encrypt_value(aead, record[name],
    event_type, name, key_id, event_id)}``, a null (or absent) value left null. The same ciphertexts
    as one ``encrypt_value`` per field, for less: the nonces come from one draw of random bytes,
    each field's its own 12 of them."""
    nonces = os.urandom(NONCE_BYTES * len(names))
    sealed, start = {}, 0
    for name in names:
        value = record.get(name)
        if value is None:
            sealed[name] = None
            continue
        nonce, start = nonces[start : start + NONCE_BYTES], start + NONCE_BYTES
        sealed[name] = _sealed_value(aead, nonce, value, event_type, name, key_id, event_id)
    return sealed


def decrypt_value(aead: AESGCM, ciphertext: bytes, event_type: str, field: str, key_id: str, event_id: str | None):
    """The value ``encrypt_value`` sealed with the same binding; ``UndecryptableField`` otherwise."""
    return json.loads(_open(_FIELD_BYTE, aead, ciphertext, event_type, field, key_id, event_id))

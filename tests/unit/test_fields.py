"""Field and payload encryption: values and payloads round-trip, and a ciphertext moved anywhere else
fails to decrypt."""

from __future__ import annotations

import json
import secrets

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from event_delivery.keys.fields import (
    FIELD_FORMAT,
    SEALED_FORMAT,
    UndecryptableField,
    decrypt_bytes,
    decrypt_value,
    encrypt_bytes,
    encrypt_fields,
    encrypt_value,
)

KEY = AESGCM(secrets.token_bytes(32))
values = st.one_of(
    st.text(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)


@given(value=values)
def test_values_round_trip_with_their_json_type(value):
    ciphertext = encrypt_value(KEY, value, "search", "query", "k1", "e1")
    assert decrypt_value(KEY, ciphertext, "search", "query", "k1", "e1") == value


def test_each_encryption_uses_a_fresh_nonce():
    assert encrypt_value(KEY, "same", "search", "query", "k1", "e1") != encrypt_value(
        KEY, "same", "search", "query", "k1", "e1"
    )


@pytest.mark.parametrize(
    "elsewhere",
    [
        ("search", "user_id", "k1", "e1"),  # another field
        ("page_view", "query", "k1", "e1"),  # another type
        ("search", "query", "k2", "e1"),  # another subject's key id
        ("search", "query", "k1", "e2"),  # another event of the same subject
    ],
)
def test_a_moved_ciphertext_does_not_decrypt(elsewhere):
    ciphertext = encrypt_value(KEY, "lofi beats", "search", "query", "k1", "e1")
    with pytest.raises(UndecryptableField):
        decrypt_value(KEY, ciphertext, *elsewhere)


def test_another_subjects_key_does_not_decrypt():
    ciphertext = encrypt_value(KEY, "lofi beats", "search", "query", "k1", "e1")
    with pytest.raises(UndecryptableField):
        decrypt_value(AESGCM(secrets.token_bytes(32)), ciphertext, "search", "query", "k1", "e1")


def test_an_altered_ciphertext_does_not_decrypt():
    ciphertext = bytearray(encrypt_value(KEY, "lofi beats", "search", "query", "k1", "e1"))
    ciphertext[-1] ^= 1
    with pytest.raises(UndecryptableField):
        decrypt_value(KEY, bytes(ciphertext), "search", "query", "k1", "e1")


def test_a_value_of_another_format_is_refused_not_misread():
    ciphertext = bytearray(encrypt_value(KEY, "lofi beats", "search", "query", "k1", "e1"))
    ciphertext[0] = FIELD_FORMAT + 1
    with pytest.raises(UndecryptableField, match="format"):
        decrypt_value(KEY, bytes(ciphertext), "search", "query", "k1", "e1")


def test_a_sealed_payload_round_trips_and_opens_only_as_the_payload_of_its_own_event():
    sealed = encrypt_bytes(KEY, b'{"user_id": "alice"', "search", "payload", "k1", "e1")
    assert sealed[0] == SEALED_FORMAT
    assert decrypt_bytes(KEY, sealed, "search", "payload", "k1", "e1") == b'{"user_id": "alice"'
    for elsewhere in (
        ("search", "payload", "k1", "e2"),  # another record under the same key: a swap
        ("search", "raw", "k1", "e1"),  # the archive's copy of the same event
        ("page_view", "payload", "k1", "e1"),
        ("search", "payload", "k2", "e1"),
    ):
        with pytest.raises(UndecryptableField):
            decrypt_bytes(KEY, sealed, *elsewhere)


def test_a_payload_and_a_field_value_cannot_pass_for_each_other():
    """Same key, type, label, key id and event: only the format byte tells the two apart."""
    value = encrypt_value(KEY, "x", "search", "payload", "k1", "e1")
    with pytest.raises(UndecryptableField, match="format"):
        decrypt_bytes(KEY, value, "search", "payload", "k1", "e1")
    payload = encrypt_bytes(KEY, b'"x"', "search", "payload", "k1", "e1")
    with pytest.raises(UndecryptableField, match="format"):
        decrypt_value(KEY, payload, "search", "payload", "k1", "e1")


@pytest.mark.parametrize("first_byte", [0, SEALED_FORMAT])
def test_a_payload_sealed_before_the_format_byte_and_event_id_were_bound_is_refused(first_byte):
    """The old form (a bare ``nonce || ciphertext``, bound to type, label and key id only) could be
    swapped between records: it is not read, even when its random nonce starts with the format byte."""
    nonce = bytes([first_byte]) + secrets.token_bytes(11)
    legacy = nonce + KEY.encrypt(nonce, b"{}", b"search\x1fpayload\x1fk1")
    with pytest.raises(UndecryptableField):
        decrypt_bytes(KEY, legacy, "search", "payload", "k1", "e1")


@pytest.mark.parametrize("event_id", ["e1", None])
def test_the_stored_format_is_the_documented_one_so_ciphertexts_of_earlier_versions_stay_readable(event_id):
    """``format || nonce || ciphertext``, the associated data ``format 0x1f type 0x1f field 0x1f key
    id 0x1f event id`` (empty without one), the value as compact JSON: stated here byte by byte, so
    that a change that encrypts and decrypts alike, and round-trips, still fails."""
    key = secrets.token_bytes(32)
    nonce = secrets.token_bytes(12)
    bound = b"\x1fsearch\x1fquery\x1fk1\x1f" + (event_id or "").encode()
    value = {"q": "café", "n": [1, 2]}
    stored = (
        bytes([FIELD_FORMAT]) + nonce + AESGCM(key).encrypt(nonce, b'{"q":"caf\xc3\xa9","n":[1,2]}', b"\x01" + bound)
    )
    assert decrypt_value(AESGCM(key), stored, "search", "query", "k1", event_id) == value

    sealed = encrypt_value(AESGCM(key), value, "search", "query", "k1", event_id)
    assert sealed[0] == FIELD_FORMAT and len(sealed) == 1 + 12 + len('{"q":"café","n":[1,2]}'.encode()) + 16
    assert json.loads(AESGCM(key).decrypt(sealed[1:13], sealed[13:], b"\x01" + bound)) == value

    payload = secrets.token_bytes(40)
    sealed = encrypt_bytes(AESGCM(key), payload, "search", "payload", "k1", event_id)
    bound = bound.replace(b"\x1fquery\x1f", b"\x1fpayload\x1f")
    assert sealed[0] == SEALED_FORMAT and AESGCM(key).decrypt(sealed[1:13], sealed[13:], b"\x02" + bound) == payload
    stored = bytes([SEALED_FORMAT]) + nonce + AESGCM(key).encrypt(nonce, payload, b"\x02" + bound)
    assert decrypt_bytes(AESGCM(key), stored, "search", "payload", "k1", event_id) == payload


@given(
    record=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), values | st.none()),
    event_id=st.none() | st.text(),
)
def test_fields_sealed_at_once_are_each_what_encrypt_value_makes_under_a_nonce_of_their_own(record, event_id):
    """Each sealed field opens as ``encrypt_value``'s does, in its own place only; null and absent
    fields stay null; no two fields of a record share a nonce (a repeat under one key breaks GCM)."""
    names = ["a", "b", "c", "d"]
    sealed = encrypt_fields(KEY, record, names, "search", "k1", event_id)
    assert list(sealed) == names
    for name in names:
        if record.get(name) is None:
            assert sealed[name] is None
            continue
        assert sealed[name][0] == FIELD_FORMAT
        assert decrypt_value(KEY, sealed[name], "search", name, "k1", event_id) == record[name]
        with pytest.raises(UndecryptableField):
            decrypt_value(KEY, sealed[name], "search", next(n for n in names if n != name), "k1", event_id)
    nonces = [c[1:13] for c in sealed.values() if c is not None]
    assert len(set(nonces)) == len(nonces)

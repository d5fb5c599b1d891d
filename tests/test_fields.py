"""Field encryption: values round-trip, and a ciphertext moved anywhere else fails to decrypt."""

from __future__ import annotations

import secrets

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from event_delivery.keys.fields import FIELD_FORMAT, UndecryptableField, decrypt_value, encrypt_value

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

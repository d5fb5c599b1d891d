"""Field encryption: values round-trip, and a ciphertext moved anywhere else fails to decrypt."""

from __future__ import annotations

import secrets

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from event_delivery.keys.fields import UndecryptableField, decrypt_value, encrypt_value

KEY = AESGCM(secrets.token_bytes(32))
values = st.one_of(
    st.text(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)


@given(value=values)
def test_values_round_trip_with_their_json_type(value):
    ciphertext = encrypt_value(KEY, value, "search", "query", "k1")
    assert decrypt_value(KEY, ciphertext, "search", "query", "k1") == value


def test_each_encryption_uses_a_fresh_nonce():
    assert encrypt_value(KEY, "same", "search", "query", "k1") != encrypt_value(KEY, "same", "search", "query", "k1")


@pytest.mark.parametrize(
    "elsewhere",
    [
        ("search", "user_id", "k1"),  # another field
        ("page_view", "query", "k1"),  # another type
        ("search", "query", "k2"),  # another subject's key id
    ],
)
def test_a_moved_ciphertext_does_not_decrypt(elsewhere):
    ciphertext = encrypt_value(KEY, "lofi beats", "search", "query", "k1")
    with pytest.raises(UndecryptableField):
        decrypt_value(KEY, ciphertext, *elsewhere)


def test_another_subjects_key_does_not_decrypt():
    ciphertext = encrypt_value(KEY, "lofi beats", "search", "query", "k1")
    with pytest.raises(UndecryptableField):
        decrypt_value(AESGCM(secrets.token_bytes(32)), ciphertext, "search", "query", "k1")


def test_an_altered_ciphertext_does_not_decrypt():
    ciphertext = bytearray(encrypt_value(KEY, "lofi beats", "search", "query", "k1"))
    ciphertext[-1] ^= 1
    with pytest.raises(UndecryptableField):
        decrypt_value(KEY, bytes(ciphertext), "search", "query", "k1")

"""The KMS key ring and keys, each with an automatic rotation period.

A rotation makes a new primary version; what the old one wraps still unwraps until it is
destroyed, which ``make rewrap`` prepares (docs/privacy.md, "Rotation"). A key that exists with
another rotation period is updated to the plan's; one with the plan's period is left alone.
"""

from __future__ import annotations

import datetime

from google.api_core import exceptions
from google.cloud import kms
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from tools.ops.provisioning.changes import UNCHANGED, UPDATED, Change, create_unless_exists, created_or_unchanged
from tools.ops.provisioning.plan import SECONDS_PER_DAY, CryptoKey


def _rotation(key: CryptoKey, now: datetime.datetime) -> dict:
    period = key.rotation_days * SECONDS_PER_DAY
    next_rotation = timestamp_pb2.Timestamp()
    next_rotation.FromDatetime(now + datetime.timedelta(seconds=period))
    return {"rotation_period": duration_pb2.Duration(seconds=period), "next_rotation_time": next_rotation}


def key_ring_request(key: CryptoKey) -> kms.CreateKeyRingRequest:
    location, _, ring_id = key.key_ring.rpartition("/keyRings/")
    return kms.CreateKeyRingRequest(parent=location, key_ring_id=ring_id, key_ring=kms.KeyRing())


def crypto_key_request(key: CryptoKey, now: datetime.datetime) -> kms.CreateCryptoKeyRequest:
    crypto_key = kms.CryptoKey(purpose=kms.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT, **_rotation(key, now))
    return kms.CreateCryptoKeyRequest(
        parent=key.key_ring, crypto_key_id=key.name.rpartition("/")[2], crypto_key=crypto_key
    )


def rotation_update_request(key: CryptoKey, now: datetime.datetime) -> kms.UpdateCryptoKeyRequest:
    return kms.UpdateCryptoKeyRequest(
        crypto_key=kms.CryptoKey(name=key.name, **_rotation(key, now)),
        update_mask=field_mask_pb2.FieldMask(paths=["rotation_period", "next_rotation_time"]),
    )


def ensure_key_ring(client, key: CryptoKey) -> Change:
    return create_unless_exists(lambda: client.create_key_ring(request=key_ring_request(key)), "key ring", key.key_ring)


def ensure_crypto_key(client, key: CryptoKey, now: datetime.datetime | None = None) -> Change:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    try:
        client.create_crypto_key(request=crypto_key_request(key, now))
        return created_or_unchanged(True, "crypto key", key.name)
    except exceptions.AlreadyExists:
        pass
    found = client.get_crypto_key(request=kms.GetCryptoKeyRequest(name=key.name))
    if _period_seconds(found) == key.rotation_days * SECONDS_PER_DAY:
        return Change(UNCHANGED, "crypto key", key.name)
    client.update_crypto_key(request=rotation_update_request(key, now))
    return Change(UPDATED, "crypto key", f"{key.name} (rotation every {key.rotation_days} days)")


def _period_seconds(found: kms.CryptoKey) -> float | None:
    if "rotation_period" not in found:
        return None
    return found.rotation_period.total_seconds()

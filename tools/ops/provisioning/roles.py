"""The worker service account's roles: each granted on the one resource that needs it.

Only ``roles/dataflow.worker`` is granted on the project, because Dataflow checks it there.
The rest is per resource: the job reads its subscriptions, reads and writes objects in its
buckets (``legacyBucketReader`` lets Beam check that a bucket exists), wraps and unwraps keys
with its KEK (and reads the key's primary version), encrypts its state with the state key,
and reads and writes rows of the keystore table.
"""

from __future__ import annotations

from tools.ops.provisioning.plan import BigtableTable, Bucket, CryptoKey, Grant, Subscription

DATAFLOW_WORKER = ("roles/dataflow.worker",)
SUBSCRIPTION_READER = ("roles/pubsub.subscriber", "roles/pubsub.viewer")
BUCKET_WRITER = ("roles/storage.objectAdmin", "roles/storage.legacyBucketReader")
KEK_USER = ("roles/cloudkms.cryptoKeyEncrypterDecrypter", "roles/cloudkms.viewer")
STATE_KEY_USER = ("roles/cloudkms.cryptoKeyEncrypterDecrypter",)
KEYSTORE_USER = ("roles/bigtable.user",)


def worker_grants(
    project: str,
    subscriptions: tuple[Subscription, ...],
    buckets: tuple[Bucket, ...],
    kek: CryptoKey | None,
    state_key: CryptoKey | None,
    keystore: BigtableTable | None,
) -> tuple[Grant, ...]:
    grants = [Grant("project", f"projects/{project}", DATAFLOW_WORKER)]
    grants += [Grant("subscription", s.path, SUBSCRIPTION_READER) for s in subscriptions]
    grants += [Grant("bucket", b.name, BUCKET_WRITER) for b in buckets]
    if kek:
        grants.append(Grant("crypto_key", kek.name, KEK_USER))
    if state_key:
        grants.append(Grant("crypto_key", state_key.name, STATE_KEY_USER))
    if keystore:
        grants.append(Grant("bigtable_table", keystore.path, KEYSTORE_USER))
    return tuple(grants)

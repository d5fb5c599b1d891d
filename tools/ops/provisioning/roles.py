"""The worker service account's roles: each granted on the one resource that needs it.

Dataflow's own service agents also get the state key, with which they encrypt a job's state.

Only ``roles/dataflow.worker`` is granted on the project, because Dataflow checks it there.
The rest is per resource: the job reads its subscriptions, reads and writes objects in its
buckets (``legacyBucketReader`` lets Beam check that a bucket exists), wraps and unwraps keys
with its KEK (and reads the key's primary version), encrypts its state with the state key,
and reads and writes rows of the keystore table.
"""

from __future__ import annotations

from tools.ops.provisioning.plan import BigtableTable, Bucket, CryptoKey, Grant, Subscription, worker_service_account

DATAFLOW_WORKER = ("roles/dataflow.worker",)
SUBSCRIPTION_READER = ("roles/pubsub.subscriber", "roles/pubsub.viewer")
BUCKET_WRITER = ("roles/storage.objectAdmin", "roles/storage.legacyBucketReader")
KEK_USER = ("roles/cloudkms.cryptoKeyEncrypterDecrypter", "roles/cloudkms.viewer")
STATE_KEY_USER = ("roles/cloudkms.cryptoKeyEncrypterDecrypter",)
KEYSTORE_USER = ("roles/bigtable.user",)
# The Dataflow service agent and the Compute Engine service agent of the project: Dataflow
# encrypts a job's state with --dataflow_kms_key through both.
DATAFLOW_SERVICE_AGENTS = (
    "serviceAccount:service-{project_number}@dataflow-service-producer-prod.iam.gserviceaccount.com",
    "serviceAccount:service-{project_number}@compute-system.iam.gserviceaccount.com",
)


def worker_grants(
    project: str,
    subscriptions: tuple[Subscription, ...],
    buckets: tuple[Bucket, ...],
    kek: CryptoKey | None,
    state_key: CryptoKey | None,
    keystore: BigtableTable | None,
) -> tuple[Grant, ...]:
    worker = (f"serviceAccount:{worker_service_account(project)}",)
    grants = [Grant("project", f"projects/{project}", DATAFLOW_WORKER, worker)]
    grants += [Grant("subscription", s.path, SUBSCRIPTION_READER, worker) for s in subscriptions]
    grants += [Grant("bucket", b.name, BUCKET_WRITER, worker) for b in buckets]
    if kek:
        grants.append(Grant("crypto_key", kek.name, KEK_USER, worker))
    if state_key:
        grants.append(Grant("crypto_key", state_key.name, STATE_KEY_USER, worker + DATAFLOW_SERVICE_AGENTS))
    if keystore:
        grants.append(Grant("bigtable_table", keystore.path, KEYSTORE_USER, worker))
    return tuple(grants)

"""Google Cloud clients that work the same against the emulators and the real services."""

from __future__ import annotations

import os

PUBSUB_EMULATOR_HOST = "PUBSUB_EMULATOR_HOST"
STORAGE_EMULATOR_HOST = "STORAGE_EMULATOR_HOST"
BIGTABLE_EMULATOR_HOST = "BIGTABLE_EMULATOR_HOST"


def storage_emulated() -> bool:
    return bool(os.environ.get(STORAGE_EMULATOR_HOST))


def use_emulator_credentials() -> None:
    """Lets Beam's GCS filesystem talk to the storage emulator without credentials.

    Beam always looks for Application Default Credentials before it opens GCS, and
    with none on the machine it retries for about 25 seconds. The emulator needs
    none, so when it is configured we record "no credentials" up front, which makes
    Beam connect anonymously at once. Against real GCS this does nothing.
    """
    if not storage_emulated():
        return
    os.environ.setdefault("NO_GCE_CHECK", "true")
    from apache_beam.internal.gcp import auth

    with auth._Credentials._credentials_lock:
        auth._Credentials._credentials = None
        auth._Credentials._credentials_init = True


def storage_client(project: str):
    """A google-cloud-storage client: anonymous on the emulator, default credentials otherwise."""
    from google.cloud import storage

    if storage_emulated():
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project, credentials=AnonymousCredentials())
    return storage.Client(project=project)


def publisher_client(**kwargs):
    from google.cloud import pubsub_v1

    return pubsub_v1.PublisherClient(**kwargs)


def subscriber_client():
    from google.cloud import pubsub_v1

    return pubsub_v1.SubscriberClient()

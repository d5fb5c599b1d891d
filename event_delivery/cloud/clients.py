"""Google Cloud clients that work the same against the emulators and the real services."""

from __future__ import annotations

import functools
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
    """A Pub/Sub subscriber client that receives any message Pub/Sub accepts, on the emulator too."""
    return _subscriber_class()()


def pubsub_emulated() -> bool:
    return bool(os.environ.get(PUBSUB_EMULATOR_HOST))


def lift_emulator_pull_limit() -> None:
    """Makes the local runner's Pub/Sub reads take any message Pub/Sub accepts (up to 10 MB).

    Against the emulator the client library opens a bare gRPC channel, which keeps
    gRPC's default 4 MB receive limit (its cloud channel has none). One larger
    message then fails every pull of the local runner's reader, which builds its
    own ``pubsub.SubscriberClient()``, and the job dies on it. Against the real
    service this does nothing.
    """
    if pubsub_emulated():
        from google.cloud import pubsub

        pubsub.SubscriberClient = _subscriber_class()


@functools.cache
def _subscriber_class():
    from google.cloud import pubsub_v1

    class SubscriberClient(pubsub_v1.SubscriberClient):
        """The library's client, with the emulator's channel as unlimited as the cloud one."""

        def __init__(self, subscriber_options=(), **kwargs):
            if pubsub_emulated() and "transport" not in kwargs:
                import grpc
                from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

                unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
                channel = grpc.insecure_channel(os.environ[PUBSUB_EMULATOR_HOST], options=unlimited)
                kwargs["transport"] = SubscriberGrpcTransport(channel=channel)
            super().__init__(subscriber_options, **kwargs)

    return SubscriberClient

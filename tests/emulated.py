"""The emulated cloud the tests run against: its project, a clean slate for subscriptions, and the flags of
a delivery job run against it."""

from __future__ import annotations

import contextlib

from event_delivery.cloud import clients
from tests.streams import local_keys

PROJECT = "local-project"


def drop_subscriptions_of(project: str, event_types) -> None:
    """Deletes the types' delivery and audit subscriptions, with all that other tests published
    to them; provisioning makes them anew, empty."""
    from google.api_core import exceptions

    from tools.ops import provision

    subscriber = clients.subscriber_client()
    for event_type in event_types:
        delivery = subscriber.subscription_path(project, event_type.subscription)
        audit_source = provision.audit_subscription(project, event_type)[0]
        for name in (delivery, audit_source):
            with contextlib.suppress(exceptions.NotFound):
                subscriber.delete_subscription(subscription=name)


def short_hours_job_args(root, state, window: int, lateness: int, trigger: int) -> list[str]:
    """The flags of a delivery job on the emulated project, writing under ``root``, with hours of ``window``
    seconds and its keys in ``state`` (provisioned here, as `make provision` does before any job)."""
    local_keys(state)
    return [
        f"--project={PROJECT}",
        f"--storage_root={root}",
        f"--window_seconds={window}",
        f"--allowed_lateness_seconds={lateness}",
        f"--trigger_seconds={trigger}",
        "--late_horizon_seconds=600",
        "--num_shards=2",
        f"--keystore=sqlite:///{state}/keystore.db",
        f"--local_key_file={state}/kek.key",
    ]

"""The emulated cloud the tests run against: its project, and a clean slate for subscriptions."""

from __future__ import annotations

import contextlib

from event_delivery.cloud import clients

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

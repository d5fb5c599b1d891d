"""Topics and subscriptions: created where missing, left as they are where they exist."""

from __future__ import annotations

from tools.ops.provisioning.changes import Change, create_unless_exists
from tools.ops.provisioning.plan import ACK_DEADLINE_SECONDS, MESSAGE_RETENTION_SECONDS, Subscription


def ensure_topic(publisher, topic: str) -> Change:
    return create_unless_exists(lambda: publisher.create_topic(name=topic), "topic", topic)


def subscription_request(subscription: Subscription) -> dict:
    request = {
        "name": subscription.path,
        "topic": subscription.topic,
        "ack_deadline_seconds": ACK_DEADLINE_SECONDS,
        "message_retention_duration": {"seconds": MESSAGE_RETENTION_SECONDS},
    }
    if subscription.filter:
        request["filter"] = subscription.filter  # set once: Pub/Sub cannot change a subscription's filter
    return request


def ensure_subscription(subscriber, subscription: Subscription) -> Change:
    request = subscription_request(subscription)
    return create_unless_exists(
        lambda: subscriber.create_subscription(request=request), "subscription", request["name"]
    )

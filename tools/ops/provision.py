"""Create each type's topic, its delivery and audit subscriptions, and the output bucket.

Each type's auditor counts from the source its tier names: an ``events-<type>-audit``
subscription of the type's topic, or an ``events-audit-counts-<type>`` subscription of the
producers' count reports, filtered to the type. The ``events-audit-counts`` topic exists
in every project, so that every producer can report to it.

Everything derives from the schema registry, and re-running is harmless::

    python -m tools.ops.provision --project local-project --bucket event-delivery-local
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from google.api_core import exceptions

from event_delivery.cloud import clients
from event_delivery.contract import counts, dead_letters
from event_delivery.contract.registry import AUDIT_SUBSCRIPTION, EventType, load_registry
from event_delivery.keys.config import add_key_arguments, key_config_from_args

ACK_DEADLINE_SECONDS = 60
RETENTION_SECONDS = 7 * 24 * 3600


def provision_type(project: str, event_type: EventType, publisher, subscriber) -> None:
    topic = publisher.topic_path(project, event_type.topic)
    with contextlib.suppress(exceptions.AlreadyExists):
        publisher.create_topic(name=topic)
    _subscribe(subscriber, subscriber.subscription_path(project, event_type.subscription), topic)
    _subscribe(subscriber, *audit_subscription(project, event_type, publisher, subscriber))


def audit_subscription(project: str, event_type: EventType, publisher, subscriber) -> tuple[str, str, str | None]:
    """``(subscription, topic, filter)`` that the type's auditor reads, by its tier's audit source."""
    subscription = subscriber.subscription_path(project, counts.auditor_subscription(event_type))
    if event_type.tier.audit_source == AUDIT_SUBSCRIPTION:
        return subscription, publisher.topic_path(project, event_type.topic), None
    return subscription, publisher.topic_path(project, counts.COUNTS_TOPIC), counts.counts_filter(event_type)


def provision_counts_topic(project: str, publisher) -> None:
    with contextlib.suppress(exceptions.AlreadyExists):
        publisher.create_topic(name=publisher.topic_path(project, counts.COUNTS_TOPIC))


def _subscribe(subscriber, subscription: str, topic: str, message_filter: str | None = None) -> None:
    request = {
        "name": subscription,
        "topic": topic,
        "ack_deadline_seconds": ACK_DEADLINE_SECONDS,
        "message_retention_duration": {"seconds": RETENTION_SECONDS},
    }
    if message_filter:
        request["filter"] = message_filter  # set once: Pub/Sub cannot change a subscription's filter
    with contextlib.suppress(exceptions.AlreadyExists):
        subscriber.create_subscription(request=request)


TEMP_RETENTION_DAYS = 1
QUARANTINE_RETENTION_DAYS = dead_letters.QUARANTINE_RETENTION_DAYS
# Under the storage root, which is the bucket's root in production, and under the root
# `make backfill` delivers into by default.
DEAD_LETTERS = ["dead-letter/", "backfill/dead-letter/"]


def temp_bucket(bucket: str) -> str:
    """Where Dataflow's temporary files go: a bucket of their own, emptied by a lifecycle rule."""
    return f"{bucket}-dataflow-tmp"


def provision_bucket(project: str, bucket: str, quarantine_retention_days: int = QUARANTINE_RETENTION_DAYS) -> None:
    """The output bucket, whose dead letters a lifecycle rule deletes after the quarantine
    retention, and the Dataflow temp bucket beside it, emptied daily."""
    client = clients.storage_client(project)
    for name in (bucket, temp_bucket(bucket)):
        with contextlib.suppress(exceptions.Conflict):
            client.create_bucket(name)
    _delete_after(client.get_bucket(bucket), quarantine_retention_days, DEAD_LETTERS)
    _delete_after(client.get_bucket(temp_bucket(bucket)), TEMP_RETENTION_DAYS)


def _delete_after(bucket, days: int, prefixes: list[str] | None = None) -> None:
    bucket.clear_lifecycle_rules()  # set, not added to: provisioning again changes nothing
    bucket.add_lifecycle_delete_rule(age=days, **({"matches_prefix": prefixes} if prefixes else {}))
    bucket.patch()


def provision(
    project: str, types: list[EventType], bucket: str | None, quarantine_retention_days: int = QUARANTINE_RETENTION_DAYS
) -> None:
    publisher, subscriber = clients.publisher_client(), clients.subscriber_client()
    provision_counts_topic(project, publisher)
    for event_type in types:
        provision_type(project, event_type, publisher, subscriber)
    if bucket:
        provision_bucket(project, bucket, quarantine_retention_days)


def main(argv=None) -> int:
    registry = load_registry()
    parser = argparse.ArgumentParser(prog="python -m tools.ops.provision", description=__doc__.split("\n")[0])
    parser.add_argument("--project", required=True, help="GCP project (local-project on the emulators).")
    parser.add_argument("--bucket", help="Output bucket to create, if any.")
    parser.add_argument(
        "--quarantine_retention_days",
        type=int,
        default=QUARANTINE_RETENTION_DAYS,
        help="Days after which a lifecycle rule deletes dead letters: they may hold personal data that names "
        f"no subject, which only this bound erases. Default: {QUARANTINE_RETENTION_DAYS}.",
    )
    parser.add_argument(
        "--event_type",
        action="append",
        choices=sorted(registry),
        help="Only this type (repeatable). Default: every type in the registry.",
    )
    add_key_arguments(parser)  # the keystore and KEK are created here, and nowhere else
    args = parser.parse_args(argv)
    if args.quarantine_retention_days <= 0:
        parser.error("--quarantine_retention_days must be positive")
    try:
        keys = key_config_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    types = [registry[name] for name in (args.event_type or sorted(registry))]
    try:
        keys.provision()
        provision(args.project, types, args.bucket, args.quarantine_retention_days)
    except exceptions.GoogleAPICallError as error:
        print(f"error: provisioning failed: {error.message}", file=sys.stderr)
        return 2
    for event_type in types:
        audit = counts.auditor_subscription(event_type)
        if event_type.tier.audit_source != AUDIT_SUBSCRIPTION:
            audit += f" (of {counts.COUNTS_TOPIC})"
        print(f"{event_type.name:16} topic {event_type.topic}, subscriptions {event_type.subscription}, {audit}")
    if args.bucket:
        print(f"bucket gs://{args.bucket}")
    print(f"keystore {keys.keystore}, key-encryption key {keys.kms_key or keys.local_key_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

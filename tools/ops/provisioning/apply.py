"""Applies a ``Plan``: each provisioner creates what is missing and says what it found as planned."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from event_delivery.cloud import clients
from tools.ops.provisioning import bigtable, buckets, iam, kms, pubsub
from tools.ops.provisioning.changes import Change
from tools.ops.provisioning.plan import Plan


def _kms_client():
    from google.cloud import kms as cloud_kms

    return cloud_kms.KeyManagementServiceClient()


def _bigtable_client(project: str):
    from google.cloud import bigtable as cloud_bigtable

    return cloud_bigtable.Client(project=project, admin=True)


def _iam_client():
    from google.cloud import iam_admin_v1

    return iam_admin_v1.IAMClient()


def _projects_client():
    from google.cloud import resourcemanager_v3

    return resourcemanager_v3.ProjectsClient()


@dataclasses.dataclass
class Clients:
    """How each client is made; tests replace the cloud-only ones with fakes that record requests."""

    publisher: Callable = clients.publisher_client
    subscriber: Callable = clients.subscriber_client
    storage: Callable = clients.storage_client
    kms: Callable = _kms_client
    bigtable: Callable = _bigtable_client
    iam: Callable = _iam_client
    projects: Callable = _projects_client


def apply_plan(plan: Plan, make: Clients | None = None) -> list[Change]:
    make = make or Clients()
    changes: list[Change] = []
    publisher, subscriber = make.publisher(), make.subscriber()
    changes += [pubsub.ensure_topic(publisher, topic) for topic in plan.topics]
    changes += [pubsub.ensure_subscription(subscriber, s) for s in plan.subscriptions]
    storage = make.storage(plan.project) if plan.buckets else None
    changes += [buckets.ensure_bucket(storage, bucket) for bucket in plan.buckets]
    key_client = make.kms() if plan.crypto_keys else None
    for key in {key.key_ring: key for key in plan.crypto_keys}.values():
        changes.append(kms.ensure_key_ring(key_client, key))
    changes += [kms.ensure_crypto_key(key_client, key) for key in plan.crypto_keys]
    table_admin = None
    if plan.bigtable:
        client = make.bigtable(plan.bigtable.project)
        table_admin = client.table_admin_client
        changes.append(bigtable.ensure_instance(client.instance_admin_client, plan.bigtable))
        changes.append(bigtable.ensure_table(table_admin, plan.bigtable))
    if plan.service_account:
        changes.append(iam.ensure_service_account(make.iam(), plan.project, plan.service_account))
        holders = {"subscription": subscriber, "crypto_key": key_client, "bigtable_table": table_admin}
        changes += _grant_roles(plan, {**holders, "project": make.projects(), "bucket": storage})
    return changes


def _grant_roles(plan: Plan, policy_holders: dict) -> list[Change]:
    """Each grant through the client of its resource's kind; a member naming ``{project_number}``
    gets the number from the project (read once, and only then)."""
    number = functools.cache(lambda: iam.project_number(policy_holders["project"], plan.project))
    changes = []
    for grant in plan.grants:
        members = tuple(m.format(project_number=number()) if "{" in m else m for m in grant.members)
        if grant.kind == "bucket":
            changes.append(iam.grant_on_bucket(policy_holders["bucket"], grant, members))
        else:
            changes.append(iam.grant(policy_holders[grant.kind], grant, members))
    return changes

"""From the registry and the flags to the ``Plan`` of what a project needs for its types."""

from __future__ import annotations

import dataclasses

from event_delivery.contract import counts
from event_delivery.contract.registry import EventType
from event_delivery.keys.bigtable import BigtableKeystore
from event_delivery.keys.config import KeyConfig, keystore_location
from tools.ops.provisioning.plan import (
    KEK_ROTATION_DAYS,
    BigtableTable,
    CryptoKey,
    Plan,
    Retention,
    buckets_of,
    subscriptions_of,
    worker_service_account,
)
from tools.ops.provisioning.roles import worker_grants


def plan_for(
    project: str,
    types: list[EventType],
    bucket: str | None = None,
    retention: Retention = Retention(),
    keys: KeyConfig | None = None,
    state_key: str | None = None,
    rotation_days: int = KEK_ROTATION_DAYS,
    bigtable_zone: str | None = None,
    worker_account: bool = False,
) -> Plan:
    """Every type's topic and subscriptions, the bucket and its temp bucket (if named), the KEK and
    the keystore's table (where ``keys`` name Cloud KMS and Bigtable), the Dataflow state key (if
    named), and with ``worker_account`` the worker service account and its roles on all of these."""
    topics = (f"projects/{project}/topics/{counts.COUNTS_TOPIC}",)
    topics += tuple(f"projects/{project}/topics/{t.topic}" for t in types)
    subscriptions = tuple(s for t in types for s in subscriptions_of(project, t))
    buckets = buckets_of(bucket, retention) if bucket else ()
    kek = CryptoKey(keys.kms_key, rotation_days, "wraps the subject keys") if keys and keys.kms_key else None
    state = CryptoKey(state_key, rotation_days, "encrypts the jobs' Dataflow state") if state_key else None
    table = None
    if keys and keys.keystore.startswith("bigtable://"):
        _, table_project, instance, table_id = keystore_location(keys.keystore)
        table = BigtableTable(table_project, instance, table_id, BigtableKeystore.FAMILY, bigtable_zone)
    plan = Plan(project, topics, subscriptions, buckets, tuple(k for k in (kek, state) if k), table)
    if not worker_account:
        return plan
    grants = worker_grants(project, subscriptions, buckets, kek, state, table)
    return dataclasses.replace(plan, service_account=worker_service_account(project), grants=grants)

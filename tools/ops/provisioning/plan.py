"""What ``make provision`` makes, as data: the plan a dry run prints and the provisioners apply.

Everything derives from the schema registry and the flags; nothing here calls a cloud API,
so a dry run and the offline tests read exactly what a real run would ask for.
"""

from __future__ import annotations

import dataclasses
import math

from event_delivery.contract import counts, dead_letters, partitions
from event_delivery.contract.registry import AUDIT_SUBSCRIPTION, EventType

ACK_DEADLINE_SECONDS = 60
MESSAGE_RETENTION_SECONDS = 7 * 24 * 3600
TEMP_RETENTION_DAYS = 1
QUARANTINE_RETENTION_DAYS = dead_letters.QUARANTINE_RETENTION_DAYS
RAW_ARCHIVE_RETENTION_DAYS = partitions.RAW_ARCHIVE_RETENTION_DAYS
KEK_ROTATION_DAYS = 90
SECONDS_PER_DAY = 24 * 3600
# The storage roots, under the bucket's root: the jobs' (make deploy) and make backfill's default.
STORAGE_ROOTS = ["", "backfill/"]
WORKER_ACCOUNT_ID = "event-delivery-worker"


def temp_bucket(bucket: str) -> str:
    """Where Dataflow's temporary files go: a bucket of their own, emptied by a lifecycle rule."""
    return f"{bucket}-dataflow-tmp"


def worker_service_account(project: str) -> str:
    """The service account the jobs' workers run as (``make deploy`` passes it)."""
    return f"{WORKER_ACCOUNT_ID}@{project}.iam.gserviceaccount.com"


@dataclasses.dataclass(frozen=True)
class Retention:
    """How long each kind of object is kept, in days; ``staging_days`` 0 keeps Dataflow's staging."""

    quarantine_days: int = QUARANTINE_RETENTION_DAYS
    raw_archive_days: int = RAW_ARCHIVE_RETENTION_DAYS
    staging_days: int = 0
    late_horizon_seconds: int = counts.LATE_HORIZON_SECONDS

    @property
    def id_index_days(self) -> int:
        """A closed hour's id index answers late repeats for the late horizon; a day more for slack."""
        return math.ceil(self.late_horizon_seconds / SECONDS_PER_DAY) + 1


@dataclasses.dataclass(frozen=True)
class DeleteRule:
    """A lifecycle rule: delete objects under ``prefixes`` (the whole bucket if none) ``age_days`` after
    they were written."""

    age_days: int
    prefixes: tuple[str, ...]
    why: str

    def as_lifecycle(self) -> dict:
        """The rule as Cloud Storage stores it (``bucket.lifecycle_rules``)."""
        condition = {"age": self.age_days, **({"matchesPrefix": list(self.prefixes)} if self.prefixes else {})}
        return {"action": {"type": "Delete"}, "condition": condition}


@dataclasses.dataclass(frozen=True)
class Bucket:
    name: str
    rules: tuple[DeleteRule, ...]


@dataclasses.dataclass(frozen=True)
class Subscription:
    path: str
    topic: str
    filter: str | None
    reader: str  # which job reads it: the delivery job or the auditor


@dataclasses.dataclass(frozen=True)
class CryptoKey:
    name: str  # projects/.../locations/.../keyRings/.../cryptoKeys/...
    rotation_days: int
    why: str

    @property
    def key_ring(self) -> str:
        return self.name.rpartition("/cryptoKeys/")[0]


@dataclasses.dataclass(frozen=True)
class BigtableTable:
    project: str
    instance: str
    table: str
    family: str
    zone: str | None  # where the instance's cluster goes, if provisioning creates the instance

    @property
    def instance_path(self) -> str:
        return f"projects/{self.project}/instances/{self.instance}"

    @property
    def path(self) -> str:
        return f"{self.instance_path}/tables/{self.table}"


@dataclasses.dataclass(frozen=True)
class Grant:
    """Roles that ``members`` get on one resource, and only there. A member may hold
    ``{project_number}``, which provisioning reads from the project."""

    kind: str  # project, subscription, bucket, crypto_key, bigtable_table
    resource: str
    roles: tuple[str, ...]
    members: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    project: str
    topics: tuple[str, ...]
    subscriptions: tuple[Subscription, ...]
    buckets: tuple[Bucket, ...] = ()
    crypto_keys: tuple[CryptoKey, ...] = ()
    bigtable: BigtableTable | None = None
    service_account: str | None = None
    grants: tuple[Grant, ...] = ()

    def lines(self) -> list[str]:
        """The plan, one resource a line, as a dry run prints it."""
        lines = [f"topic {topic}" for topic in self.topics]
        for s in self.subscriptions:
            lines.append(f"subscription {s.path} of {s.topic} ({s.reader}{f', filter {s.filter}' if s.filter else ''})")
        for bucket in self.buckets:
            lines.append(f"bucket gs://{bucket.name}")
            lines += [f"  delete {', '.join(r.prefixes) or '*'} after {r.age_days} days: {r.why}" for r in bucket.rules]
        lines += [
            f"crypto key {key.name}, rotated every {key.rotation_days} days ({key.why})" for key in self.crypto_keys
        ]
        if self.bigtable:
            lines.append(f"bigtable instance {self.bigtable.instance_path} (cluster in {self.bigtable.zone or '-'})")
            lines.append(f"bigtable table {self.bigtable.path}, family {self.bigtable.family} (1 version)")
        if self.service_account:
            lines.append(f"service account {self.service_account}")
        worker = (f"serviceAccount:{self.service_account}",)
        for g in self.grants:
            to = "" if g.members == worker else f" to {', '.join(g.members)}"
            lines.append(f"  {', '.join(g.roles)} on {g.kind} {g.resource}{to}")
        return lines


def subscriptions_of(project: str, event_type: EventType) -> list[Subscription]:
    """The type's delivery subscription, and the one its auditor reads, by its tier's audit source."""
    topic = f"projects/{project}/topics/{event_type.topic}"
    audit_topic, audit_filter = topic, None
    if event_type.tier.audit_source != AUDIT_SUBSCRIPTION:
        audit_topic, audit_filter = f"projects/{project}/topics/{counts.COUNTS_TOPIC}", counts.counts_filter(event_type)
    audit = f"projects/{project}/subscriptions/{counts.auditor_subscription(event_type)}"
    return [
        Subscription(f"projects/{project}/subscriptions/{event_type.subscription}", topic, None, "delivery"),
        Subscription(audit, audit_topic, audit_filter, "auditor"),
    ]


def output_bucket_rules(retention: Retention) -> tuple[DeleteRule, ...]:
    def under_roots(folder: str) -> tuple[str, ...]:
        return tuple(f"{root}{folder}" for root in STORAGE_ROOTS)

    rules = [
        DeleteRule(
            retention.quarantine_days,
            under_roots("dead-letter/"),
            "dead letters may hold personal data that names no subject (--quarantine_retention_days)",
        ),
        DeleteRule(
            retention.raw_archive_days,
            (f"{partitions.RAW_ARCHIVE}/",),
            "the backfill window; bounds the envelopes and key ids kept (--raw_archive_retention_days)",
        ),
        DeleteRule(
            retention.id_index_days,
            under_roots("delivered/_index/"),
            "closed hours' ids, read by late repeats for the late horizon, plus a day",
        ),
    ]
    if retention.staging_days:
        rules.append(DeleteRule(retention.staging_days, ("staging/",), "Dataflow's staged packages"))
    return tuple(rules)


def buckets_of(bucket: str, retention: Retention) -> tuple[Bucket, ...]:
    temp_rule = DeleteRule(TEMP_RETENTION_DAYS, (), "Dataflow's temporary files")
    return Bucket(bucket, output_bucket_rules(retention)), Bucket(temp_bucket(bucket), (temp_rule,))

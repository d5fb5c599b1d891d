"""Provision everything a type needs: its topic, its delivery and audit subscriptions, the bucket
and its lifecycle rules, the keys; on Dataflow also the KMS keys, the Bigtable keystore and the
worker service account with its roles.

Each type's auditor counts from the source its tier names: an ``events-<type>-audit``
subscription of the type's topic, or an ``events-audit-counts-<type>`` subscription of the
producers' count reports, filtered to the type. The ``events-audit-counts`` topic exists
in every project, so that every producer can report to it.

Everything derives from the schema registry. Re-running changes nothing and says so (one
``unchanged:`` line a resource, and a summary); ``--dry_run`` prints the plan only::

    python -m tools.ops.provision --project local-project --bucket event-delivery-local
    python -m tools.ops.provision --project my-project --bucket my-bucket --for_dataflow \\
        --region europe-west1 --dry_run
"""

from __future__ import annotations

import argparse
import sys

from google.api_core import exceptions

from event_delivery.contract.registry import EventType, load_registry
from event_delivery.keys.config import DEFAULT_KEYSTORE, KeyConfig, add_key_arguments, key_config_from_args
from event_delivery.keys.kek import KeysNotFound
from tools.ops import job_flags
from tools.ops.provisioning import changes as outcomes
from tools.ops.provisioning.apply import apply_plan
from tools.ops.provisioning.plan import (
    ACK_DEADLINE_SECONDS,
    KEK_ROTATION_DAYS,
    QUARANTINE_RETENTION_DAYS,
    RAW_ARCHIVE_RETENTION_DAYS,
    TEMP_RETENTION_DAYS,
    Retention,
    subscriptions_of,
    temp_bucket,
)
from tools.ops.provisioning.planning import plan_for

__all__ = ["ACK_DEADLINE_SECONDS", "QUARANTINE_RETENTION_DAYS", "TEMP_RETENTION_DAYS", "temp_bucket"]


def audit_subscription(project: str, event_type: EventType) -> tuple[str, str, str | None]:
    """``(subscription, topic, filter)`` that the type's auditor reads, by its tier's audit source."""
    audit = subscriptions_of(project, event_type)[1]
    return audit.path, audit.topic, audit.filter


def provision(
    project: str, types: list[EventType], bucket: str | None, quarantine_retention_days: int = QUARANTINE_RETENTION_DAYS
) -> list[outcomes.Change]:
    """Topics, subscriptions and (if named) the bucket, as on the emulators; returns what it did."""
    return apply_plan(plan_for(project, types, bucket, Retention(quarantine_days=quarantine_retention_days)))


def provision_keys(keys: KeyConfig) -> outcomes.Change:
    """The KEK, the keystore and its pseudonym secret, made where missing (``KeyConfig.provision``)."""
    try:
        keys.check()
        existed = True
    except KeysNotFound:
        existed = False
    keys.provision()
    what = f"{keys.keystore}, key-encryption key {keys.kms_key or keys.local_key_file}"
    return outcomes.created_or_unchanged(not existed, "keystore", what)


def _parser(registry) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.ops.provision", description=__doc__.split("\n")[0])
    parser.add_argument("--project", required=True, help="GCP project (local-project on the emulators).")
    parser.add_argument("--bucket", help="Output bucket to create, with its Dataflow temp bucket, if any.")
    parser.add_argument(
        "--event_type",
        action="append",
        choices=sorted(registry),
        help="Only this type (repeatable). Default: every type in the registry.",
    )
    _add_retention_arguments(parser)
    cloud = parser.add_argument_group("Dataflow")
    cloud.add_argument(
        "--for_dataflow",
        action="store_true",
        help="Also the Dataflow state key and the worker service account with its roles; the keystore and "
        "the KEK default to make deploy's (Bigtable and Cloud KMS). Needs --region.",
    )
    cloud.add_argument("--region", help="Region of the KMS key ring and of the Bigtable cluster's zone.")
    cloud.add_argument("--bigtable_zone", help="Zone of the keystore instance's cluster. Default: <region>-b.")
    cloud.add_argument(
        "--kek_rotation_days",
        type=int,
        default=KEK_ROTATION_DAYS,
        help="Automatic rotation period of the KMS keys (run make rewrap after each rotation, docs/privacy.md). "
        f"Default: {KEK_ROTATION_DAYS}.",
    )
    parser.add_argument("--dry_run", action="store_true", help="Print the plan; change nothing.")
    add_key_arguments(parser)  # the keystore and KEK are created here, and nowhere else
    return parser


def _add_retention_arguments(parser) -> None:
    group = parser.add_argument_group("retention (bucket lifecycle rules)")
    group.add_argument(
        "--quarantine_retention_days",
        type=int,
        default=QUARANTINE_RETENTION_DAYS,
        help="Days after which a lifecycle rule deletes dead letters: they may hold personal data that names "
        f"no subject, which only this bound erases. Default: {QUARANTINE_RETENTION_DAYS}.",
    )
    group.add_argument(
        "--raw_archive_retention_days",
        type=int,
        default=RAW_ARCHIVE_RETENTION_DAYS,
        help="Days after which a lifecycle rule deletes the raw archive (raw/): the window in which an hour "
        f"can be backfilled. Default: {RAW_ARCHIVE_RETENTION_DAYS}.",
    )
    group.add_argument(
        "--staging_retention_days",
        type=int,
        default=0,
        help="Days after which Dataflow's staged packages (staging/) are deleted. A running job's workers "
        "read them whenever they start, so set it above the age of the oldest running job. Default: 0 (kept).",
    )


def _resolved_keys(args) -> KeyConfig:
    """The key flags, with make deploy's Bigtable keystore and KMS key where a Dataflow run names none."""
    if args.for_dataflow:
        if args.keystore == DEFAULT_KEYSTORE:
            args.keystore = job_flags.default_keystore(args.project)
        args.kms_key = args.kms_key or job_flags.default_kms_key(args.project, args.region)
    return key_config_from_args(args)


def main(argv=None) -> int:
    registry = load_registry()
    parser = _parser(registry)
    args = parser.parse_args(argv)
    retention = Retention(args.quarantine_retention_days, args.raw_archive_retention_days, args.staging_retention_days)
    if min(retention.quarantine_days, retention.raw_archive_days, args.kek_rotation_days) <= 0:
        parser.error("retention and rotation periods must be positive")
    if args.for_dataflow and not args.region:
        parser.error("--for_dataflow needs --region")
    try:
        keys = _resolved_keys(args)
    except ValueError as error:
        parser.error(str(error))
    types = [registry[name] for name in (args.event_type or sorted(registry))]
    zone = args.bigtable_zone or (f"{args.region}-b" if args.region else None)
    state_key = job_flags.state_kms_key(args.project, args.region) if args.for_dataflow else None
    plan = plan_for(
        args.project, types, args.bucket, retention, keys, state_key, args.kek_rotation_days, zone, args.for_dataflow
    )
    if args.dry_run:
        print("\n".join(["would provision:", *plan.lines(), f"keystore {keys.keystore} and its pseudonym secret"]))
        return 0
    try:
        changes = apply_plan(plan)
        changes.append(provision_keys(keys))
    except exceptions.GoogleAPICallError as error:
        print(f"error: provisioning failed: {error.message}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: provisioning failed: {error}", file=sys.stderr)
        return 2
    print("\n".join(change.line() for change in changes))
    print(outcomes.summary(changes))
    return 0


if __name__ == "__main__":
    sys.exit(main())

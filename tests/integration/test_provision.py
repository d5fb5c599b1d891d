"""`make provision` on the emulators: Pub/Sub, GCS (lifecycle rules included) and Bigtable.

What only the cloud has (KMS, IAM) is tested offline in ``test_provision_requests.py``.
"""

from __future__ import annotations

import uuid

import pytest

from event_delivery.cloud import clients
from event_delivery.contract import counts
from tools.ops import provision
from tools.ops.provisioning.plan import temp_bucket

pytestmark = pytest.mark.emulators

PROJECT = "local-project"


@pytest.fixture
def flags(emulators, bigtable_emulator, tmp_path):
    bucket = f"prov-{uuid.uuid4().hex[:10]}"
    keystore = f"bigtable://{PROJECT}/event-delivery/keys-{uuid.uuid4().hex[:8]}"
    key_flags = ["--keystore", keystore, "--local_key_file", str(tmp_path / "kek.key")]
    return bucket, keystore, ["--project", PROJECT, "--bucket", bucket, "--event_type", "play", *key_flags]


def _lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_a_second_run_changes_nothing_and_says_so(flags, capsys, registry):
    bucket, keystore, argv = flags
    assert provision.main(argv) == 0
    first = _lines(capsys)
    assert f"created: bucket gs://{bucket} (3 lifecycle rules)" in first
    assert (
        f"created: bigtable table projects/{PROJECT}/instances/event-delivery/tables/{keystore.rsplit('/')[-1]}"
        in first
    )
    assert any(line.startswith("created: keystore ") for line in first)

    assert provision.main(argv) == 0
    second = _lines(capsys)
    assert second[-1] == f"nothing to change: {len(second) - 1} resources as planned"
    assert all(line.startswith("unchanged: ") for line in second[:-1]), second

    subscriber = clients.subscriber_client()
    for name in ("events-play-delivery", counts.auditor_subscription(registry["play"])):
        subscriber.get_subscription(subscription=f"projects/{PROJECT}/subscriptions/{name}")


def test_the_buckets_get_every_retention_rule(flags, capsys):
    bucket, _, argv = flags
    assert provision.main([*argv, "--raw_archive_retention_days", "60", "--staging_retention_days", "45"]) == 0
    storage = clients.storage_client(PROJECT)
    ages = {
        tuple(rule["condition"].get("matchesPrefix", ())): rule["condition"]["age"]
        for rule in storage.get_bucket(bucket).lifecycle_rules
    }
    assert ages == {
        ("dead-letter/", "backfill/dead-letter/"): provision.QUARANTINE_RETENTION_DAYS,
        ("raw/",): 60,
        ("delivered/_index/", "backfill/delivered/_index/"): 8,  # the 7-day late horizon and a day
        ("staging/",): 45,
    }
    temp_rules = storage.get_bucket(temp_bucket(bucket)).lifecycle_rules
    assert [rule["condition"] for rule in temp_rules] == [{"age": provision.TEMP_RETENTION_DAYS}]

    capsys.readouterr()
    assert provision.main(argv) == 0  # a changed retention replaces the rules, and says so
    assert f"updated: bucket gs://{bucket} (3 lifecycle rules)" in _lines(capsys)
    assert {rule["condition"]["age"] for rule in storage.get_bucket(bucket).lifecycle_rules} == {30, 90, 8}


def test_the_keystore_table_keeps_one_version_in_the_keystores_family(flags, capsys):
    from google.cloud import bigtable

    _, keystore, argv = flags
    assert provision.main(argv) == 0
    project, instance, table = keystore.removeprefix("bigtable://").split("/")
    families = bigtable.Client(project=project, admin=True).instance(instance).table(table).list_column_families()
    assert list(families) == ["k"]
    assert families["k"].gc_rule.to_pb().max_num_versions == 1

"""`make provision --for_dataflow` offline: what no emulator serves (KMS, IAM, Bigtable's instances,
the project's policy) is checked against the client libraries' own request types (``fake_cloud``)."""

from __future__ import annotations

import datetime

import pytest
from google.cloud import bigtable_admin_v2, kms
from google.iam.v1 import policy_pb2

from event_delivery.keys.config import KeyConfig
from tests.fake_cloud import FakeCloud, FakeProjects
from tools.ops import job_flags, provision
from tools.ops.provisioning.apply import apply_plan
from tools.ops.provisioning.changes import UNCHANGED
from tools.ops.provisioning.plan import Retention
from tools.ops.provisioning.planning import plan_for

PROJECT, REGION, BUCKET = "my-project", "europe-west1", "my-bucket"
WORKER = f"serviceAccount:event-delivery-worker@{PROJECT}.iam.gserviceaccount.com"
NINETY_DAYS = datetime.timedelta(days=90)


def dataflow_plan(registry, rotation_days: int = 90):
    keys = KeyConfig(job_flags.default_keystore(PROJECT), kms_key=job_flags.default_kms_key(PROJECT, REGION))
    state_key = job_flags.state_kms_key(PROJECT, REGION)
    types = list(registry.values())
    return plan_for(
        PROJECT, types, BUCKET, Retention(), keys, state_key, rotation_days, f"{REGION}-b", worker_account=True
    )


def test_a_second_run_creates_nothing_and_writes_no_policy(registry):
    cloud, plan = FakeCloud(), dataflow_plan(registry)
    first = apply_plan(plan, cloud.clients())
    assert {change.outcome for change in first} >= {"created", "updated"}
    writes = [len(holder.set_requests) for holder in (cloud.pubsub, cloud.kms, cloud.projects)]

    second = apply_plan(plan, cloud.clients())
    assert [change.outcome for change in second] == [UNCHANGED] * len(second)
    assert len(second) == len(first)
    assert [len(holder.set_requests) for holder in (cloud.pubsub, cloud.kms, cloud.projects)] == writes
    assert not cloud.kms.updates
    assert {bucket.patches for bucket in cloud.storage.buckets.values()} == {1}, "rules set once"
    assert {bucket.policy_writes for bucket in cloud.storage.buckets.values()} == {1}


def test_the_kms_keys_rotate_on_a_period(registry):
    cloud = FakeCloud()
    before = datetime.datetime.now(datetime.timezone.utc)
    apply_plan(dataflow_plan(registry), cloud.clients())
    ring = f"projects/{PROJECT}/locations/{REGION}/keyRings/event-delivery"
    assert cloud.kms.created[ring] == kms.CreateKeyRingRequest(
        parent=f"projects/{PROJECT}/locations/{REGION}", key_ring_id="event-delivery", key_ring=kms.KeyRing()
    )
    keys = {name: request for name, request in cloud.kms.created.items() if "/cryptoKeys/" in name}
    assert sorted(keys) == [f"{ring}/cryptoKeys/dataflow-state", f"{ring}/cryptoKeys/subject-keys"]
    for request in keys.values():
        key = request.crypto_key
        assert key.purpose == kms.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT
        assert key.rotation_period == NINETY_DAYS
        assert before + NINETY_DAYS <= key.next_rotation_time <= before + NINETY_DAYS + datetime.timedelta(minutes=1)


def test_a_key_with_another_rotation_period_is_updated_to_the_plans(registry):
    cloud = FakeCloud()
    apply_plan(dataflow_plan(registry), cloud.clients())
    changes = apply_plan(dataflow_plan(registry, rotation_days=30), cloud.clients())
    assert sum(change.outcome == "updated" and change.kind == "crypto key" for change in changes) == 2
    for update in cloud.kms.updates:
        assert update.crypto_key.rotation_period == datetime.timedelta(days=30)
        assert list(update.update_mask.paths) == ["rotation_period", "next_rotation_time"]


def test_the_keystore_instance_and_table(registry):
    cloud = FakeCloud()
    apply_plan(dataflow_plan(registry), cloud.clients())
    [instance] = cloud.bigtable.instance_admin_client.created.values()
    assert instance.parent == f"projects/{PROJECT}" and instance.instance_id == "event-delivery"
    [cluster] = instance.clusters.values()
    assert cluster.location == f"projects/{PROJECT}/locations/{REGION}-b"
    [table] = cloud.bigtable.table_admin_client.created.values()
    assert table.table_id == "subject-keys"
    assert dict(table.table.column_families) == {
        "k": bigtable_admin_v2.ColumnFamily(gc_rule=bigtable_admin_v2.GcRule(max_num_versions=1))
    }


def _granted(cloud: FakeCloud) -> dict[str, set[str]]:
    """Every resource whose policy names the worker, with the roles it holds there."""
    granted: dict[str, set[str]] = {}
    for holder in (cloud.pubsub, cloud.kms, cloud.projects, cloud.bigtable.table_admin_client):
        for resource, policy in holder.policies.items():
            roles = {binding.role for binding in policy.bindings if WORKER in binding.members}
            granted[resource] = roles
    for name, bucket in cloud.storage.buckets.items():
        granted[name] = {binding["role"] for binding in bucket.policy.bindings if WORKER in binding["members"]}
    return granted


def test_the_worker_holds_roles_on_exactly_the_planned_resources(registry):
    cloud, plan = FakeCloud(), dataflow_plan(registry)
    apply_plan(plan, cloud.clients())
    granted = _granted(cloud)
    planned = {s.path for s in plan.subscriptions} | {b.name for b in plan.buckets}
    planned |= {k.name for k in plan.crypto_keys} | {plan.bigtable.path}
    assert set(granted) == planned | {f"projects/{PROJECT}"}
    assert granted[f"projects/{PROJECT}"] == {"roles/dataflow.worker"}, "the one role Dataflow checks on the project"
    assert granted[job_flags.state_kms_key(PROJECT, REGION)] == {"roles/cloudkms.cryptoKeyEncrypterDecrypter"}
    assert granted[plan.bigtable.path] == {"roles/bigtable.user"}
    assert all(
        "admin" not in role or role == "roles/storage.objectAdmin" for roles in granted.values() for role in roles
    )
    [account] = cloud.iam.created.values()
    assert account.name == f"projects/{PROJECT}" and account.account_id == "event-delivery-worker"


def test_dataflows_service_agents_may_encrypt_state_with_the_state_key(registry):
    cloud = FakeCloud()
    apply_plan(dataflow_plan(registry), cloud.clients())
    [binding] = cloud.kms.policies[job_flags.state_kms_key(PROJECT, REGION)].bindings
    number = FakeProjects.NUMBER
    assert binding.role == "roles/cloudkms.cryptoKeyEncrypterDecrypter"
    assert set(binding.members) == {
        WORKER,
        f"serviceAccount:service-{number}@dataflow-service-producer-prod.iam.gserviceaccount.com",
        f"serviceAccount:service-{number}@compute-system.iam.gserviceaccount.com",
    }


def test_a_grant_keeps_the_policys_other_bindings(registry):
    cloud, plan = FakeCloud(), dataflow_plan(registry)
    project = f"projects/{PROJECT}"
    held = policy_pb2.Policy(etag=b"v7")
    held.bindings.add(role="roles/dataflow.worker", members=["user:ops@example.com"])
    held.bindings.add(role="roles/viewer", members=["group:readers@example.com"])
    cloud.projects.policies[project] = held
    apply_plan(plan, cloud.clients())
    [written] = cloud.projects.set_requests
    assert written.policy.etag == b"v7", "written back with the etag read: a concurrent change is refused"
    members = {binding.role: set(binding.members) for binding in written.policy.bindings}
    assert members == {
        "roles/dataflow.worker": {"user:ops@example.com", WORKER},
        "roles/viewer": {"group:readers@example.com"},
    }


def test_a_dry_run_prints_the_plan_and_changes_nothing(monkeypatch, capsys):
    def refuse(*args):
        raise AssertionError("a dry run applies nothing")

    monkeypatch.setattr(provision, "apply_plan", refuse)
    argv = ["--project", PROJECT, "--bucket", BUCKET, "--for_dataflow", "--region", REGION, "--dry_run"]
    assert provision.main([*argv, "--event_type", "play"]) == 0
    out = capsys.readouterr().out
    assert "delete raw/ after 90 days" in out
    assert "delete delivered/_index/, backfill/delivered/_index/ after 8 days" in out
    assert f"crypto key {job_flags.default_kms_key(PROJECT, REGION)}, rotated every 90 days" in out
    assert f"bigtable table projects/{PROJECT}/instances/event-delivery/tables/subject-keys" in out
    assert f"roles/dataflow.worker on project projects/{PROJECT}" in out


@pytest.mark.parametrize("flag", ["--raw_archive_retention_days", "--quarantine_retention_days", "--kek_rotation_days"])
def test_a_retention_or_rotation_must_be_positive(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        provision.main(["--project", PROJECT, flag, "0", "--dry_run"])
    assert exit_.value.code == 2

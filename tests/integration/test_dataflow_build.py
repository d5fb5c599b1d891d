"""Every type's job translates for Dataflow and stages to the GCS emulator (nothing is submitted)."""

from __future__ import annotations

import io
import tarfile

import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.portability.api import beam_runner_api_pb2

from event_delivery.cloud import files
from event_delivery.contract import counts
from event_delivery.contract.registry import AUDIT_PRODUCER_COUNTS
from tools.ops.deploy import auditor_args, auditor_job_name, dataflow_args, dry_run
from tools.ops.provisioning.plan import worker_service_account
from transforms.personal import DEAD_LETTERS as GIVEN_UP_IN_CLEAR

pytestmark = pytest.mark.emulators

# Where cleartext enters the job, and the steps that seal it; everything else passes it on.
CLEARTEXT_FROM = (
    "ParseEvents/",
    "StageDelivered/DeadLetterFailedWrites/UnsealFailedWrites",
    "WriteLate/DeadLetterFailedWrites/UnsealFailedWrites",
)
SEALERS = ("EncryptPersonalFields/", "SealDeadLetters/", "ArchiveRawMessages/SealRawMessages")

STEPS = [
    "ReadMessages",
    "ParseEvents",
    "EncryptPersonalFields",
    "GatherPanes",
    "StageDelivered",
    "WriteLate",
    "WriteDeadLetters",
    "CloseHour",
    "ArchiveRawMessages",
]


def test_every_type_builds_for_dataflow(registry, bucket):
    for name, event_type in sorted(registry.items()):
        job = dry_run(dataflow_args(event_type, "local-project", "europe-west1", bucket, update=False))
        assert job.proto.type.name == "JOB_TYPE_STREAMING"
        assert job.proto.name == f"events-{name.replace('_', '-')}"
        labels = dict(job.proto.labels)
        assert labels == {"event_type": name, "tier": event_type.tier.name}

        staged = files.glob(f"gs://{bucket}/staging/{job.proto.name}.*/*")
        [pipeline_path] = [p for p in staged if p.endswith("/pipeline.pb")]
        pipeline = beam_runner_api_pb2.Pipeline()
        with FileSystems.open(pipeline_path) as handle:
            pipeline.ParseFromString(handle.read())
        top_level = {t.unique_name for t in pipeline.components.transforms.values() if "/" not in t.unique_name}
        assert set(STEPS) <= top_level, f"{name}: stable step names are what --update matches on"

        if event_type.personal_fields:
            shuffled = shuffles_of_cleartext(pipeline)
            assert not shuffled, f"{name}: personal data in clear crosses {shuffled}"

        [package] = [p for p in staged if p.endswith("/workflow.tar.gz")]
        with FileSystems.open(package) as handle, tarfile.open(fileobj=io.BytesIO(handle.read())) as archive:
            members = archive.getnames()
        assert any(m.endswith(f"avro_schemas/{name}.avsc") for m in members), "workers get the registry"


def test_every_types_auditor_builds_for_dataflow_as_a_job_of_its_own(registry, bucket):
    for name, event_type in sorted(registry.items()):
        job = dry_run(auditor_args(event_type, "local-project", "europe-west1", bucket), auditor=True)
        assert job.proto.type.name == "JOB_TYPE_STREAMING"
        assert job.proto.name == auditor_job_name(event_type) != f"events-{name.replace('_', '-')}"
        assert dict(job.proto.labels) == {"event_type": name, "tier": event_type.tier.name, "role": "auditor"}
        staged = files.glob(f"gs://{bucket}/staging/{job.proto.name}.*/*")
        [pipeline_path] = [p for p in staged if p.endswith("/pipeline.pb")]
        with FileSystems.open(pipeline_path) as handle:
            built = handle.read()
        source = event_type.audit_subscription
        if event_type.tier.audit_source == AUDIT_PRODUCER_COUNTS:
            source = counts.counts_subscription(event_type)
        assert f"subscriptions/{source}".encode() in built, f"{name}: the auditor reads its own source"
        assert event_type.subscription.encode() not in built, f"{name}: not the delivery job's subscription"


def test_the_job_keeps_cleartext_out_of_temp_files_and_encrypts_its_state(registry, bucket):
    """Exception sampling would copy a failing step's input, cleartext before encryption, to
    temp_location: it is off, temp files go to a bucket of their own, and state uses our KMS key."""
    job = dry_run(dataflow_args(registry["search"], "local-project", "europe-west1", bucket, update=False))
    environment = job.proto.environment
    assert "disable_always_on_exception_sampling" in environment.experiments
    assert environment.temp_storage_prefix.startswith(f"storage.googleapis.com/{bucket}-dataflow-tmp/")
    assert environment.service_kms_key_name.endswith("/keyRings/event-delivery/cryptoKeys/dataflow-state")
    assert environment.service_account_email == worker_service_account("local-project"), "the provisioned worker"


def shuffles_of_cleartext(pipeline) -> list[str]:
    """The steps that shuffle or keep state (group by key, stateful ParDo) on a collection
    that holds parsed, not yet sealed, messages."""
    transforms = pipeline.components.transforms
    leaves = {name: t for name, t in transforms.items() if not t.subtransforms}
    cleartext = set()
    changed = True
    while changed:  # propagate along the graph until nothing new is reached
        changed = False
        for leaf in leaves.values():
            name = leaf.unique_name
            if name.startswith(SEALERS):  # sealed, bar what a sealer gives up in clear for the dead letters
                new = {pcoll for tag, pcoll in leaf.outputs.items() if tag == GIVEN_UP_IN_CLEAR} - cleartext
                cleartext |= new
                changed |= bool(new)
                continue
            if name.startswith(CLEARTEXT_FROM) or cleartext & set(leaf.inputs.values()):
                new = set(leaf.outputs.values()) - cleartext
                cleartext |= new
                changed |= bool(new)
    return [leaf.unique_name for leaf in leaves.values() if cleartext & set(leaf.inputs.values()) and _shuffles(leaf)]


def _shuffles(transform) -> bool:
    if transform.spec.urn == "beam:transform:group_by_key:v1":
        return True
    if transform.spec.urn == "beam:transform:pardo:v1":
        payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
        return bool(payload.state_specs or payload.timer_family_specs)
    return False

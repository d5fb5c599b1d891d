"""The flags each job of a type takes on Dataflow: the delivery job's, sized by its tier, and
its auditor's; and ``job_layout``, the options that shape a job's state, which every deploy
records and an in-place update must keep."""

from __future__ import annotations

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.registry import EventType
from tools.ops.provisioning.plan import temp_bucket, worker_service_account
from transforms.records import schema_fingerprint

SDK_STATE_CACHE_MB = 0  # see _streaming_job; the bench runs its pipelines with the same


def default_keystore(project: str) -> str:
    return f"bigtable://{project}/event-delivery/subject-keys"


def default_kms_key(project: str, region: str) -> str:
    return f"projects/{project}/locations/{region}/keyRings/event-delivery/cryptoKeys/subject-keys"


def state_kms_key(project: str, region: str) -> str:
    return f"projects/{project}/locations/{region}/keyRings/event-delivery/cryptoKeys/dataflow-state"


def dataflow_args(
    event_type: EventType,
    project: str,
    region: str,
    bucket: str,
    update: bool,
    keystore: str | None = None,
    kms_key: str | None = None,
    run_id: str | None = None,
    codec: str = files.AVRO_CODEC,
) -> list[str]:
    """The delivery job's flags on Dataflow; the tier sets the resources.

    The layout, the run id and the codec are always explicit, so the job's options record
    them for a later ``--update`` to compare and keep. ``run_id`` defaults to a new one.
    """
    layout = [f"--{name}={value}" for name, value in job_layout(event_type).items()]
    args = [
        f"--keystore={keystore or default_keystore(project)}",
        f"--kms_key={kms_key or default_kms_key(project, region)}",
        f"--raw_archive_root=gs://{bucket}/raw",
        *_streaming_job(event_type, project, region, bucket, job_name(event_type), event_type.tier.max_workers),
        *layout,
        f"--run_id={run_id or partitions.new_run_id()}",
        f"--codec={codec}",
    ]
    if update:
        args.append("--update")
    return args


def _streaming_job(event_type: EventType, project: str, region: str, bucket: str, name: str, max_workers: int):
    """The flags every streaming job of a type takes on Dataflow, the delivery job's and the auditor's."""
    return [
        f"--event_type={event_type.name}",
        f"--project={project}",
        f"--region={region}",
        f"--storage_root=gs://{bucket}",
        "--runner=DataflowRunner",
        f"--job_name={name}",
        # Dataflow's temporary files go to a bucket of their own, which a lifecycle rule empties
        # (make provision); exception sampling, which would copy a failing step's input element
        # there, is off; the job's state is encrypted with our key.
        f"--temp_location=gs://{temp_bucket(bucket)}/tmp",
        "--experiments=disable_always_on_exception_sampling",
        f"--dataflow_kms_key={state_kms_key(project, region)}",
        # The workers run as the account make provision --for_dataflow grants roles on these resources only.
        f"--service_account_email={worker_service_account(project)}",
        f"--staging_location=gs://{bucket}/staging",
        "--setup_file=./setup.py",
        "--enable_streaming_engine",
        # No state cache in the Python SDK harness (Beam's default, kept on purpose): it weighs
        # every value it caches by walking the globals of every loaded module (objsize),
        # milliseconds a state write; the path's state is one cell per id, read about once.
        f"--max_cache_memory_usage_mb={SDK_STATE_CACHE_MB}",
        "--autoscaling_algorithm=THROUGHPUT_BASED",
        f"--max_num_workers={max_workers}",
        f"--labels=event_type={event_type.name}",
        f"--labels=tier={event_type.tier.name}",
    ]


def job_name(event_type: EventType) -> str:
    return f"events-{event_type.name.replace('_', '-')}"


def auditor_job_name(event_type: EventType) -> str:
    return f"{job_name(event_type)}-audit"


AUDITOR_MAX_WORKERS = 3  # it counts, it does not deliver: a few workers for any type


def auditor_args(event_type: EventType, project: str, region: str, bucket: str) -> list[str]:
    """The type's auditor job on Dataflow: a job of its own, beside the delivery job and
    sharing nothing with it but the bucket it checks (``pipelines/auditor.py``)."""
    return [
        *_streaming_job(event_type, project, region, bucket, auditor_job_name(event_type), AUDITOR_MAX_WORKERS),
        f"--window_seconds={partitions.HOUR_SECONDS}",
        f"--allowed_lateness_seconds={event_type.tier.allowed_lateness_seconds}",
        "--labels=role=auditor",
    ]


# Why an update must keep each option of ``job_layout``: what changing it under the
# state, timers and buffered panes the update carries over would do.
_SPLITS_HOURS = "splitting open hours"
KEPT_BECAUSE = {
    # An in-flight event's hour, when that hour closes, and its shard: the hour could close twice.
    "window_seconds": _SPLITS_HOURS,
    "allowed_lateness_seconds": _SPLITS_HOURS,
    "num_shards": _SPLITS_HOURS,
    # Every hour window's allowed lateness is twice the horizon, and parsing sends what is
    # older than it to the dead letters. Dataflow does not re-window what the job holds: the
    # windows and timers it keeps would hold the old lateness while new events got the new.
    "late_horizon_seconds": "changing the allowed lateness of every window the job holds state in",
    # The trigger of every step that forms panes, part of their windowing strategy; panes
    # buffered under the old trigger keep it, so one job would fire panes on two schedules.
    "trigger_seconds": "changing the trigger of the panes the job holds",
    "max_pane_bytes": "changing the trigger of the panes the job holds",
    # What the job's stateful steps are keyed by and how their keys are encoded, and the
    # triggers of its groupings, as this code keeps them: state of another layout would be
    # read under the wrong coder (transforms.settings.STATE_LAYOUT).
    "state_layout": "handing its state to code that keeps state in another layout",
    # Events in flight carry their records encoded under the running job's delivered schema,
    # which nothing in them names (transforms.records): written under another, a file is corrupt.
    "schema_fingerprint": "writing the events in flight under a schema they were not encoded with",
}


def job_layout(event_type: EventType) -> dict[str, int]:
    """The options a deployed job of the type runs with that an in-place update must keep
    (``KEPT_BECAUSE`` says why, option by option); every deploy records them explicitly.

    The other options are left to change: ``target_file_mb``, ``max_event_bytes`` and
    ``max_future_seconds`` decide how a close groups files and what parsing accepts, not
    the graph, a coder or what state holds; ``codec`` only how files are compressed, and
    each file names its own (an hour's parts keep the codec its saved plan names). The raw
    archive adds steps of its own, which an update may add but not remove; every deploy
    archives, so none removes them.
    """
    tier = event_type.tier
    streaming, delivery = _delivery_defaults()
    return {
        "window_seconds": partitions.HOUR_SECONDS,
        "allowed_lateness_seconds": tier.allowed_lateness_seconds,
        "num_shards": tier.num_shards,
        "late_horizon_seconds": streaming.late_horizon_seconds,
        "trigger_seconds": streaming.trigger_seconds,
        "max_pane_bytes": delivery.max_pane_bytes,
        "state_layout": delivery.state_layout,
        "schema_fingerprint": schema_fingerprint(event_type),
    }


def _delivery_defaults():
    """The delivery job's shared and own options (``HourOptions``, ``DeliveryOptions``) as they
    are when no flag sets them."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.flags import HourOptions
    from pipelines.options import DeliveryOptions

    defaults = PipelineOptions([])
    return defaults.view_as(HourOptions), defaults.view_as(DeliveryOptions)

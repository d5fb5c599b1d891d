"""Deploy delivery jobs to Dataflow: one streaming job per type, sized by its tier.

    python -m event_delivery.ops.deploy --project my-project --region europe-west1 \\
        --bucket my-bucket --event_type play          # one type
    python -m event_delivery.ops.deploy ... --tier high   # every type of a tier
    python -m event_delivery.ops.deploy ... --update      # replace running jobs in place
    python -m event_delivery.ops.deploy ... --dry_run     # build, validate and stage only
    python -m event_delivery.ops.deploy ... --drain       # stop reading, finish open hours, stop

A dry run translates each job for Dataflow and stages its artifacts (the package,
the pipeline proto) to ``gs://<bucket>/staging`` without submitting anything; CI
runs it against the GCS emulator. A drain goes through ``gcloud dataflow jobs drain``:
the job stops pulling, its watermark advances to the end, so every open hour closes
with its marker, and no message is left unacknowledged.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from event_delivery.contract.registry import TIERS, EventType, load_registry


def default_keystore(project: str) -> str:
    return f"bigtable://{project}/event-delivery/subject-keys"


def default_kms_key(project: str, region: str) -> str:
    return f"projects/{project}/locations/{region}/keyRings/event-delivery/cryptoKeys/subject-keys"


def dataflow_args(
    event_type: EventType,
    project: str,
    region: str,
    bucket: str,
    update: bool,
    keystore: str | None = None,
    kms_key: str | None = None,
) -> list[str]:
    """The delivery job's flags on Dataflow; the tier sets the resources."""
    args = [
        f"--keystore={keystore or default_keystore(project)}",
        f"--kms_key={kms_key or default_kms_key(project, region)}",
        f"--event_type={event_type.name}",
        f"--project={project}",
        f"--region={region}",
        f"--storage_root=gs://{bucket}",
        f"--raw_archive_root=gs://{bucket}/raw",
        "--runner=DataflowRunner",
        f"--job_name={job_name(event_type)}",
        f"--temp_location=gs://{bucket}/tmp",
        f"--staging_location=gs://{bucket}/staging",
        "--setup_file=./setup.py",
        "--enable_streaming_engine",
        "--autoscaling_algorithm=THROUGHPUT_BASED",
        f"--max_num_workers={event_type.tier.max_workers}",
        f"--labels=event_type={event_type.name}",
        f"--labels=tier={event_type.tier.name}",
    ]
    if update:
        args.append("--update")
    return args


def job_name(event_type: EventType) -> str:
    return f"events-{event_type.name.replace('_', '-')}"


def drain(event_type: EventType, project: str, region: str, dry_run: bool) -> list[str]:
    """Drains the type's running job; returns the ids drained (or, dry, the commands it would run)."""
    where = [f"--project={project}", f"--region={region}"]
    listing = ["gcloud", "dataflow", "jobs", "list", *where, "--status=active"]
    listing += [f"--filter=name={job_name(event_type)}", "--format=value(id)"]
    if dry_run:
        return [" ".join(listing), " ".join(["gcloud", "dataflow", "jobs", "drain", *where, "<job id>"])]
    ids = subprocess.run(listing, check=True, capture_output=True, text=True).stdout.split()
    for job_id in ids:
        subprocess.run(["gcloud", "dataflow", "jobs", "drain", *where, job_id], check=True)
    return ids


def dry_run(argv: list[str]):
    """Translates and stages one job without submitting it; returns the staged job."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.dataflow.internal import apiclient

    from pipelines import delivery

    argv = [*argv, "--dry_run=True", "--no_auth", "--sdk_location=container"]
    result, _ = delivery.start(argv)
    options = PipelineOptions(argv)
    apiclient.DataflowApplicationClient(options, result.job.root_staging_location).create_job_description(result.job)
    return result.job


def selected_types(names: list[str] | None, tier: str | None) -> list[EventType]:
    registry = load_registry()
    if tier:
        return sorted((t for t in registry.values() if t.tier.name == tier), key=lambda t: t.name)
    return [registry[name] for name in names]


def main(argv=None) -> int:
    registry = load_registry()
    parser = argparse.ArgumentParser(prog="python -m event_delivery.ops.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--bucket", required=True, help="Output, temp and staging bucket, without gs://.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--event_type", action="append", choices=sorted(registry))
    which.add_argument("--tier", choices=sorted(TIERS, key=lambda name: TIERS[name].recovery_order))
    parser.add_argument("--keystore", help="Default: bigtable://<project>/event-delivery/subject-keys")
    parser.add_argument(
        "--kms_key",
        help="Default: projects/<project>/locations/<region>/keyRings/event-delivery/cryptoKeys/subject-keys",
    )
    parser.add_argument("--update", action="store_true", help="Update running jobs in place (stable step names).")
    parser.add_argument(
        "--drain", action="store_true", help="Drain the running jobs instead: open hours close, then they stop."
    )
    parser.add_argument("--dry_run", action="store_true", help="Build and stage (or list the drain) only.")
    args = parser.parse_args(argv)
    from pipelines import delivery

    for event_type in selected_types(args.event_type, args.tier):
        if args.drain:
            done = drain(event_type, args.project, args.region, args.dry_run)
            print(f"{event_type.name}: " + ("would run: " + "; ".join(done) if args.dry_run else f"draining {done}"))
            continue
        job_args = dataflow_args(
            event_type, args.project, args.region, args.bucket, args.update, args.keystore, args.kms_key
        )
        if args.dry_run:
            job = dry_run(job_args)
            print(f"{event_type.name}: built and staged to {job.root_staging_location} (not submitted)")
        else:
            delivery.start(job_args)
            print(f"{event_type.name}: submitted as {job_name(event_type)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Deploy delivery jobs to Dataflow: one streaming job per type, sized by its tier, and
beside each its auditor, a small job that counts what is published.

    python -m tools.ops.deploy --project my-project --region europe-west1 \\
        --bucket my-bucket --event_type play          # one type
    python -m tools.ops.deploy ... --tier high   # every type of a tier
    python -m tools.ops.deploy ... --update      # replace running jobs in place, keeping their run
    python -m tools.ops.deploy ... --dry_run     # build, validate and stage only
    python -m tools.ops.deploy ... --drain       # stop reading and stop; open hours stay staged
    python -m tools.ops.deploy ... --template gs://my-bucket/templates/delivery.json   # from the Flex Template

A dry run translates each job for Dataflow and stages its artifacts (the package,
the pipeline proto) to ``gs://<bucket>/staging`` without submitting anything; CI
runs it against the GCS emulator. A drain goes through ``gcloud dataflow jobs drain``:
the job stops pulling and its watermark jumps to the end, so every close timer fires;
a close whose hour is still open by the clock publishes nothing, and the next run
closes such hours when their time comes (``transforms/close.py``).

An update replaces the running job in place, keeping its state, so the new job must
keep its run id (which tells its staged files from earlier runs') and the options
that shape that state (``job_flags.job_layout`` says which, and why each). The running job's
options come from ``gcloud dataflow jobs describe``; an update that would change one
is refused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from event_delivery.cloud import files
from event_delivery.contract.registry import TIERS, EventType, load_registry, tier_types
from tools.ops.flex_launch import launch_command
from tools.ops.flex_template import default_image
from tools.ops.job_flags import (
    KEPT_BECAUSE,
    auditor_args,
    auditor_job_name,
    dataflow_args,
    job_layout,
    job_name,
)


class UpdateRefused(Exception):
    """An update would not keep the running job's hours whole; the message is one line."""


def _gcloud_jobs(project: str, region: str, verb: str, *rest: str) -> list[str]:
    return ["gcloud", "dataflow", "jobs", verb, f"--project={project}", f"--region={region}", *rest]


def _listing(event_type: EventType, project: str, region: str) -> list[str]:
    """The command that prints the ids of the type's active jobs."""
    return _gcloud_jobs(
        project, region, "list", "--status=active", f"--filter=name={job_name(event_type)}", "--format=value(id)"
    )


def _describing(project: str, region: str, job_id: str) -> list[str]:
    # The default summary view leaves out the environment, which holds the options.
    return _gcloud_jobs(project, region, "describe", job_id, "--full", "--format=json")


def running_job(event_type: EventType, project: str, region: str) -> dict:
    """The type's running job as a Dataflow ``Job`` resource (full view), from gcloud.

    The only call to the cloud an update makes; tests replace it with a recorded job.
    Raises ``UpdateRefused`` unless exactly one job of that name is active.
    """
    ids = subprocess.run(_listing(event_type, project, region), check=True, capture_output=True, text=True).stdout
    if len(ids.split()) != 1:
        raise UpdateRefused(f"{job_name(event_type)}: {len(ids.split())} active jobs, not one, to update")
    described = subprocess.run(_describing(project, region, ids.strip()), check=True, capture_output=True, text=True)
    return json.loads(described.stdout)


def job_options(job: dict) -> dict:
    """The pipeline options a ``Job`` resource records (``environment.sdkPipelineOptions.options``).

    The Python SDK stores them under their own snake_case names, numbers as floats
    (a protobuf ``Struct``); the camelCase names of Java-style options are read too.
    """
    recorded = job.get("environment", {}).get("sdkPipelineOptions", {}).get("options", {})
    return {**{_snake(name): value for name, value in recorded.items()}, **recorded}


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def kept_run_id(event_type: EventType, job: dict) -> str:
    """The running job's run id, for the new job to keep; raises ``UpdateRefused`` (one line)
    if the job records none or the new job's layout differs from it.

    An option the running job does not record refuses the update too (drain it and deploy
    once). The SDK records every option it knows, defaults included, so a job deployed
    before ``job_layout`` named an option still records the default it ran with.
    """
    running = job_options(job)
    name = job_name(event_type)
    for option, new in job_layout(event_type).items():
        old = running.get(option)
        if old is None:
            raise UpdateRefused(f"{name}: the running job records no --{option}; drain it and deploy instead")
        if int(old) != new:
            raise UpdateRefused(
                f"{name}: --{option} would change from {int(old)} to {new}, {KEPT_BECAUSE[option]}; "
                "drain the job and deploy instead"
            )
    if not running.get("run_id"):
        raise UpdateRefused(f"{name}: the running job records no --run_id; drain it and deploy instead")
    return running["run_id"]


def drain(event_type: EventType, project: str, region: str, dry_run: bool) -> list[str]:
    """Drains the type's running job; returns the ids drained (or, dry, the commands it would run)."""
    listing = _listing(event_type, project, region)
    if dry_run:
        return [" ".join(listing), " ".join(_gcloud_jobs(project, region, "drain", "<job id>"))]
    ids = subprocess.run(listing, check=True, capture_output=True, text=True).stdout.split()
    for job_id in ids:
        subprocess.run(_gcloud_jobs(project, region, "drain", job_id), check=True)
    return ids


def update_plan(event_type: EventType, project: str, region: str) -> list[str]:
    """What an update of the type's job does, for ``--dry_run``: nothing here calls gcloud."""
    layout = " ".join(f"--{name}={value}" for name, value in job_layout(event_type).items())
    return [
        " ".join(_listing(event_type, project, region)),
        " ".join(_describing(project, region, "<job id>")),
        f"submit {job_name(event_type)} with --update and the running job's --run_id, if it runs with {layout}",
    ]


def dry_run(argv: list[str], auditor: bool = False):
    """Translates and stages one job (the delivery job, or the auditor) without submitting
    it; returns the staged job."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.dataflow.internal import apiclient

    argv = [*argv, "--dry_run=True", "--no_auth", "--sdk_location=container"]
    if auditor:
        [result], _ = _start_auditor(argv)
    else:
        result, _ = _start_delivery(argv)
    options = PipelineOptions(argv)
    apiclient.DataflowApplicationClient(options, result.job.root_staging_location).create_job_description(result.job)
    return result.job


def _start_delivery(argv: list[str]):
    from pipelines import delivery

    return delivery.start(argv)


def _start_auditor(argv: list[str]):
    from pipelines import auditor

    return auditor.start(argv)


def selected_types(names: list[str] | None, tier: str | None) -> list[EventType]:
    if tier:
        return tier_types(tier)
    registry = load_registry()
    return [registry[name] for name in names]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.ops.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--bucket", required=True, help="Output, temp and staging bucket, without gs://.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--event_type", action="append", choices=sorted(load_registry()))
    which.add_argument("--tier", choices=sorted(TIERS, key=lambda name: TIERS[name].recovery_order))
    parser.add_argument("--keystore", help="Default: bigtable://<project>/event-delivery/subject-keys")
    parser.add_argument(
        "--kms_key",
        help="Default: projects/<project>/locations/<region>/keyRings/event-delivery/cryptoKeys/subject-keys",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="Update running jobs in place (stable step names), keeping their run id; refused if the "
        "window, lateness, shard count, late horizon or trigger would change. With --dry_run, print the steps only.",
    )
    parser.add_argument(
        "--drain", action="store_true", help="Drain the running jobs instead: open hours close, then they stop."
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="Build and stage only (or print the steps of a drain or an update)."
    )
    parser.add_argument(
        "--template",
        help="Launch the delivery jobs from this Flex Template spec (make template: gs://<bucket>/templates/"
        "delivery.json) with gcloud, not from this checkout. With --dry_run, print the command.",
    )
    parser.add_argument("--image", help="The template's image, for the workers. Default: the one make template builds.")
    parser.add_argument(
        "--codec",
        choices=files.CODECS,
        help=f"The codec of the delivered, late and dead-letter files. Default: {files.AVRO_CODEC} for a new job; "
        "an update keeps the running job's.",
    )
    parser.add_argument(
        "--no_auditor",
        action="store_true",
        help="Deploy the delivery jobs only. By default a deploy (not an update) also starts each type's auditor.",
    )
    return parser


def _deploy(event_type: EventType, args, run_id: str | None, codec: str) -> None:
    """Submits (or, dry, builds and stages) the type's delivery job and, unless told not to,
    its auditor."""
    job_args = dataflow_args(
        event_type, args.project, args.region, args.bucket, args.update, args.keystore, args.kms_key, run_id, codec
    )
    if args.template:
        _launch_from_template(event_type, job_args, args)
    elif args.dry_run:
        job = dry_run(job_args)
        print(f"{event_type.name}: built and staged to {job.root_staging_location} (not submitted)")
    else:
        _start_delivery(job_args)
        kept = f", keeping run {run_id}" if run_id else ""
        print(f"{event_type.name}: submitted as {job_name(event_type)}{kept}")
    if args.update or args.no_auditor:
        return  # a running auditor keeps counting across the delivery job's update
    audit_args = auditor_args(event_type, args.project, args.region, args.bucket)
    if args.dry_run:
        job = dry_run(audit_args, auditor=True)
        print(f"{event_type.name}: auditor built and staged to {job.root_staging_location} (not submitted)")
    else:
        _start_auditor(audit_args)
        print(f"{event_type.name}: auditor submitted as {auditor_job_name(event_type)}")


def _launch_from_template(event_type: EventType, job_args: list[str], args) -> None:
    image = args.image or default_image(args.project, args.region)
    command = launch_command(job_args, args.template, image)
    if args.dry_run:
        print(f"{event_type.name}: would run: {' '.join(command)}")
        return
    subprocess.run(command, check=True)
    print(f"{event_type.name}: launched from {args.template} as {job_name(event_type)}")


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    types = selected_types(args.event_type, args.tier)
    if args.drain:
        for event_type in types:
            done = drain(event_type, args.project, args.region, args.dry_run)
            print(f"{event_type.name}: " + ("would run: " + "; ".join(done) if args.dry_run else f"draining {done}"))
        return 0
    if args.update and args.dry_run:
        for event_type in types:
            print(f"{event_type.name}: would run: " + "; ".join(update_plan(event_type, args.project, args.region)))
        return 0
    try:
        # Every type is checked before any is submitted, so a refused tier updates no job.
        running = {t.name: running_job(t, args.project, args.region) for t in types if args.update}
        run_ids = {t.name: kept_run_id(t, running[t.name]) for t in types if args.update}
    except UpdateRefused as refused:
        parser.exit(2, f"{parser.prog}: error: {refused}\n")
    for event_type in types:
        kept = job_options(running[event_type.name]).get("codec") if args.update else None
        _deploy(event_type, args, run_ids.get(event_type.name), args.codec or kept or files.AVRO_CODEC)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The auditor: an independent count of what was published to a type, per hour.

Delivery counts what it did; the auditor counts what went in, so that a delivery bug
cannot hide itself. It shares no code with the delivery job (nothing from
``transforms/``): only the contract (the registry, the envelope, the layout), the cloud
helpers and the flags both jobs take (``pipelines.flags``). Per hour of ``received_at``
(buckets of ``--window_seconds``) it counts the messages and their distinct event ids,
and when the hour closes (its end plus the allowed lateness, as delivery closes it) it writes
``<storage_root>/audit/<type>/dt=…/hr=…/counts.json``. A message that arrives after that
(a late event) rewrites the file ``--trigger_seconds`` later, with the new totals.
Then, ``--check_delay_seconds`` later (default: the tier's close margin, by which
delivery must have closed the hour), it compares the count with what delivery wrote
for the hour and counts what is in no output as ``audit/lost``. ``make audit`` does the
same comparison from the files, with the hours' close delays.

Where the counts come from is chosen per tier (``Tier.audit_source``, or ``--audit_source``):
its own subscription of the type's topic, or the producers' count reports
(``pipelines.audit_sources``). What each costs per TB, and why distinct ids are a sketch:
``docs/operations.md``, "The auditor". The job reads as its steps: ``AuditType`` reads,
counts (``audit_sources``), writes and checks (``audit_checks``); its flags and settings are
``auditor_settings``.

Run it locally for every type in one process, a pipeline per type (a process per type
would add seven interpreters to the seven delivery jobs on a machine of two cores; on
Dataflow each type is its own job, so that types stay isolated there)::

    python -m pipelines.auditor --event_types all --project local-project \\
        --storage_root gs://event-delivery-local --window_seconds 10 --allowed_lateness_seconds 5

and on Dataflow, one job per type::

    python -m pipelines.auditor --event_type play --project my-project --storage_root gs://my-bucket \\
        --runner DataflowRunner --region europe-west1 --temp_location gs://my-bucket/tmp --setup_file ./setup.py
"""

from __future__ import annotations

import logging
import sys
import typing

import apache_beam as beam
from apache_beam.options.pipeline_options import GoogleCloudOptions, StandardOptions

from event_delivery.cloud import preflight
from event_delivery.cloud.clients import lift_emulator_pull_limit, use_emulator_credentials
from event_delivery.contract.registry import AUDIT_SUBSCRIPTION
from pipelines.audit_checks import CheckLostFn, CountLostFn, WriteCountsFn
from pipelines.audit_sources import CountMessages, SumCountReports
from pipelines.auditor_settings import AuditSettings, add_auditor_arguments, auditor_settings
from pipelines.flags import add_hour_arguments, add_trigger_argument, exit_on_help
from pipelines.runtime import LOCAL_RUNNER, pipeline_options, start_logging
from pipelines.supervisor import run_until_stopped

PROG = "python -m pipelines.auditor"
READY_LINE = "auditing "


class AuditPublished(beam.PTransform):
    """One type's messages (or count reports) in; the counts written, per hour, out."""

    def __init__(self, settings: AuditSettings):
        super().__init__()
        self.settings = settings

    def expand(self, messages):
        s = self.settings
        if s.source == AUDIT_SUBSCRIPTION:
            counted = messages | "CountMessages" >> CountMessages(s)
        else:
            counted = messages | "SumCountReports" >> SumCountReports(s)
        written = counted | "WriteCounts" >> beam.ParDo(WriteCountsFn(s)).with_output_types(tuple[int, typing.Any])
        written | "CheckLost" >> beam.ParDo(CheckLostFn(s)) | "CountLost" >> beam.ParDo(CountLostFn())
        return written


class AuditType(beam.PTransform):
    """One type's auditor, from its subscription: a branch of the job, labelled by the type."""

    def __init__(self, settings: AuditSettings, project: str):
        super().__init__()
        self.settings = settings
        self.project = project

    def expand(self, pipeline):
        subscription = self.settings.subscription(self.project)
        return (
            pipeline
            | "ReadFromPubSub" >> beam.io.ReadFromPubSub(subscription=subscription, with_attributes=True)
            | "AuditPublished" >> AuditPublished(self.settings)
        )


def start(argv: list[str]):
    """Builds and starts the job, one pipeline per type; returns their results and the runner.
    Flag errors exit with code 2."""
    exit_on_help(argv, PROG, __doc__, add_hour_arguments, add_trigger_argument, add_auditor_arguments)
    options = pipeline_options(argv)
    project = options.view_as(GoogleCloudOptions).project
    standard = options.view_as(StandardOptions)
    try:
        settings = auditor_settings(options)
        if not project:
            raise ValueError("--project is required")
        if standard.runner != LOCAL_RUNNER and len(settings) > 1:
            raise ValueError("on a remote runner each type is a job of its own: use --event_type")
    except (KeyError, ValueError) as error:
        preflight.fail(PROG, str(error).strip("'\""))
    use_emulator_credentials()
    standard.streaming = True
    if standard.runner == LOCAL_RUNNER:
        with preflight.exit_on_failure(PROG):
            for s in settings:
                preflight.check_subscription(s.subscription(project))
            preflight.check_root(settings[0].layout.audit, project)
        lift_emulator_pull_limit()
    results = []
    for s in settings:
        # A pipeline per type, also when one process runs them all: the local runner works
        # a pipeline on one thread, which an idle Pub/Sub read blocks for up to 30 s, so
        # types sharing a pipeline would wait on each other's empty pulls.
        pipeline = beam.Pipeline(options=options)
        pipeline | f"Audit {s.event_type.name}" >> AuditType(s, project)
        results.append(pipeline.run())
    logging.info("%s%s to %s", READY_LINE, ", ".join(s.event_type.name for s in settings), settings[0].layout.audit)
    return results, standard.runner


def main(argv=None) -> int:
    start_logging()
    argv = sys.argv[1:] if argv is None else argv
    results, runner = start(argv)
    if runner != LOCAL_RUNNER:
        return 0  # the remote service runs the job from here on
    return run_until_stopped(results, "auditor")


if __name__ == "__main__":
    sys.exit(main())

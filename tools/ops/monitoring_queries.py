"""What the alert policies and dashboards read: the metric types, Cloud Monitoring filters
and PromQL selectors over them, and how a tier's resources are named and ordered.

Counter-based conditions are PromQL over ``dataflow.googleapis.com/job/user_counter``:
Dataflow reports a user counter as its running total, so the last hour's increase is the
total now minus the total an hour ago (or zero, for a counter the job created since).
"""

from __future__ import annotations

import json
import re

from event_delivery.contract import slo
from event_delivery.contract.registry import TIERS

SYSTEM = "event-delivery"  # the user label that marks what this system's monitoring manages

# The metric types the policies and dashboards read, with their monitored resource types.
OLDEST_UNACKED_AGE = "pubsub.googleapis.com/subscription/oldest_unacked_message_age"
WATERMARK_AGE = "dataflow.googleapis.com/job/data_watermark_age"
SYSTEM_LAG = "dataflow.googleapis.com/job/system_lag"
IS_FAILED = "dataflow.googleapis.com/job/is_failed"
VCPUS = "dataflow.googleapis.com/job/current_num_vcpus"  # reported every minute while the job has workers
USER_COUNTER = "dataflow.googleapis.com/job/user_counter"  # Beam metrics; the name in label metric_name
ALL_JOBS = "events-.+"  # every job of this system, as job_flags.job_name names them
SUBSCRIPTION = "pubsub_subscription"
JOB = "dataflow_job"

ALIGNMENT = {"seconds": 60}  # Dataflow and Pub/Sub sample these metrics every minute


def ordered_tiers(names=None) -> list[str]:
    return [name for name in sorted(TIERS, key=lambda n: TIERS[n].recovery_order) if names is None or name in names]


def display_name(tier: str, title: str) -> str:
    return f"Event delivery [{tier}] {title}"


def _one_of(values) -> str:
    return "one_of(" + ", ".join(json.dumps(v) for v in values) + ")"


def subscriptions_filter(metric_type: str, subscriptions: list[str]) -> str:
    return (
        f'resource.type = "{SUBSCRIPTION}" AND metric.type = "{metric_type}" '
        f"AND resource.label.subscription_id = {_one_of(subscriptions)}"
    )


def jobs_filter(metric_type: str, jobs: list[str], metric_names: list[str] | None = None) -> str:
    selected = f" AND metric.label.metric_name = {_one_of(metric_names)}" if metric_names else ""
    return (
        f'resource.type = "{JOB}" AND metric.type = "{metric_type}" '
        f"AND resource.label.job_name = {_one_of(jobs)}{selected}"
    )


def promql_name(metric_type: str) -> str:
    """A Cloud Monitoring metric type as PromQL names it: the first ``/`` becomes ``:``, and
    every other character PromQL does not allow becomes ``_``."""
    domain, path = metric_type.split("/", 1)
    return re.sub(r"[^A-Za-z0-9_]", "_", domain) + ":" + re.sub(r"[^A-Za-z0-9_]", "_", path)


def counter(jobs_regex: str, metric_name: str) -> str:
    """The user counters of the matching jobs; ``metric_name`` is a PromQL regex."""
    return (
        f'{promql_name(USER_COUNTER)}{{monitored_resource="{JOB}", '
        f'job_name=~"{jobs_regex}", metric_name=~"{metric_name}"}}'
    )


def jobs_regex(jobs: list[str]) -> str:
    # Dataflow job names are [-a-z0-9], nothing a regex would read as an operator.
    unsafe = [job for job in jobs if not re.fullmatch(r"[-a-z0-9]+", job)]
    if unsafe:
        raise ValueError(f"not Dataflow job names: {unsafe}")
    return "|".join(jobs)


def increase(selector: str, window_seconds: int, by: str = "job_name") -> str:
    """The increase of running totals over the window, summed by ``by``; a total that did not
    exist at the window's start counts from zero (Beam creates a counter at its first use)."""
    now = f"sum by ({by}) ({selector})"
    before = f"sum by ({by}) ({selector} offset {window_seconds}s)"
    return f"({now} - ({before} or {now} * 0))"


def dead_letter_rate(jobs_regex: str, window_seconds: int) -> str:
    dead_lettered = increase(counter(jobs_regex, f"{slo.DEAD_LETTERED_PREFIX}.+"), window_seconds)
    received = increase(counter(jobs_regex, slo.RECEIVED), window_seconds)
    return f"{dead_lettered} / {received}"

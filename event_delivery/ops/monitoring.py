"""Alerts and dashboards as code: Cloud Monitoring alert policies and one dashboard per tier.

    python -m event_delivery.ops.monitoring --dry_run                   # print them as JSON
    python -m event_delivery.ops.monitoring --project my-project        # create or update them
    python -m event_delivery.ops.monitoring --project my-project --tier high \\
        --notification_channel projects/my-project/notificationChannels/123

Everything derives from the registry: a tier's policies watch the subscriptions and jobs
of its types, with the thresholds of ``event_delivery.contract.slo``. For each tier:

- **backlog**: the oldest unacked message on a delivery subscription or an auditor's;
- **lag**: the job's data watermark age or system lag;
- **dead-letter rate**: dead-lettered / in over the last hour, per job;
- **hours overdue**: an hour's marker written after its close deadline;
- **not running**: a failed job, or a job that stopped reporting;

and, for every tier alike (lost = 0 is every tier's objective), **data lost**: an auditor
found messages that are in no output. Each policy's documentation names its section of
the runbook (``docs/operations.md``).

Applying is idempotent: a policy or dashboard with the same display name is updated in
place, never duplicated. The printed JSON is the REST form of ``AlertPolicy`` and
``Dashboard``, which ``gcloud monitoring policies create --policy-from-file`` and
``gcloud monitoring dashboards create --config-from-file`` also read.

Counter-based conditions are PromQL over ``dataflow.googleapis.com/job/user_counter``:
Dataflow reports a user counter as its running total, so the last hour's increase is the
total now minus the total an hour ago (or zero, for a counter the job created since).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from event_delivery.cloud import preflight
from event_delivery.contract import slo
from event_delivery.contract.counts import auditor_subscription
from event_delivery.contract.registry import TIERS, tier_types
from event_delivery.ops.deploy import job_name

PROG = "python -m event_delivery.ops.monitoring"
RUNBOOK = "docs/operations.md"
SYSTEM = "event-delivery"  # the user label that marks what this module manages

# The metric types the policies and dashboards read, with their monitored resource types.
OLDEST_UNACKED_AGE = "pubsub.googleapis.com/subscription/oldest_unacked_message_age"
WATERMARK_AGE = "dataflow.googleapis.com/job/data_watermark_age"
SYSTEM_LAG = "dataflow.googleapis.com/job/system_lag"
IS_FAILED = "dataflow.googleapis.com/job/is_failed"
VCPUS = "dataflow.googleapis.com/job/current_num_vcpus"  # reported every minute while the job has workers
USER_COUNTER = "dataflow.googleapis.com/job/user_counter"  # Beam metrics; the name in label metric_name
ALL_JOBS = "events-.+"  # every job of this system, as deploy.job_name names them
SUBSCRIPTION = "pubsub_subscription"
JOB = "dataflow_job"

SEVERITY = {"high": "CRITICAL", "normal": "ERROR", "low": "WARNING"}
ALIGNMENT = {"seconds": 60}  # Dataflow and Pub/Sub sample these metrics every minute


def _ordered_tiers(names=None) -> list[str]:
    return [name for name in sorted(TIERS, key=lambda n: TIERS[n].recovery_order) if names is None or name in names]


def display_name(tier: str, title: str) -> str:
    return f"Event delivery [{tier}] {title}"


# Filters (Cloud Monitoring's filter language) and PromQL selectors.


def _one_of(values) -> str:
    return "one_of(" + ", ".join(json.dumps(v) for v in values) + ")"


def _subscriptions_filter(metric_type: str, subscriptions: list[str]) -> str:
    return (
        f'resource.type = "{SUBSCRIPTION}" AND metric.type = "{metric_type}" '
        f"AND resource.label.subscription_id = {_one_of(subscriptions)}"
    )


def _jobs_filter(metric_type: str, jobs: list[str], metric_names: list[str] | None = None) -> str:
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


def _counter(jobs_regex: str, metric_name: str) -> str:
    """The user counters of the matching jobs; ``metric_name`` is a PromQL regex."""
    return (
        f'{promql_name(USER_COUNTER)}{{monitored_resource="{JOB}", '
        f'job_name=~"{jobs_regex}", metric_name=~"{metric_name}"}}'
    )


def _jobs_regex(jobs: list[str]) -> str:
    # Dataflow job names are [-a-z0-9], nothing a regex would read as an operator.
    unsafe = [job for job in jobs if not re.fullmatch(r"[-a-z0-9]+", job)]
    if unsafe:
        raise ValueError(f"not Dataflow job names: {unsafe}")
    return "|".join(jobs)


def _increase(selector: str, window_seconds: int, by: str = "job_name") -> str:
    """The increase of running totals over the window, summed by ``by``; a total that did not
    exist at the window's start counts from zero (Beam creates a counter at its first use)."""
    now = f"sum by ({by}) ({selector})"
    before = f"sum by ({by}) ({selector} offset {window_seconds}s)"
    return f"({now} - ({before} or {now} * 0))"


def _dead_letter_rate(jobs_regex: str, window_seconds: int) -> str:
    dead_lettered = _increase(_counter(jobs_regex, f"{slo.DEAD_LETTERED_PREFIX}.+"), window_seconds)
    received = _increase(_counter(jobs_regex, slo.RECEIVED), window_seconds)
    return f"{dead_lettered} / {received}"


# Alert policies.


def _documentation(summary: str, anchor: str) -> dict:
    return {
        "mime_type": "text/markdown",
        "content": f"{summary}\n\nRunbook: `{RUNBOOK}#{anchor}` in the event-delivery repository.",
    }


def _policy(tier: str, title: str, conditions: list[dict], summary: str, anchor: str, channels) -> dict:
    return {
        "display_name": display_name(tier, title),
        "documentation": _documentation(summary, anchor),
        "user_labels": {"system": SYSTEM, "tier": tier},
        "conditions": conditions,
        "combiner": "OR",
        "enabled": True,
        "severity": SEVERITY.get(tier, "CRITICAL"),
        "notification_channels": list(channels),
    }


def _above(name: str, filter_: str, threshold: float, for_seconds: int, group_by: str) -> dict:
    return {
        "display_name": name,
        "condition_threshold": {
            "filter": filter_,
            "aggregations": [
                {
                    "alignment_period": ALIGNMENT,
                    "per_series_aligner": "ALIGN_MAX",
                    "cross_series_reducer": "REDUCE_MAX",
                    "group_by_fields": [group_by],
                }
            ],
            "comparison": "COMPARISON_GT",
            "threshold_value": threshold,
            "duration": {"seconds": for_seconds},
            "trigger": {"count": 1},
        },
    }


def _promql(name: str, query: str) -> dict:
    return {
        "display_name": name,
        "condition_prometheus_query_language": {
            "query": query,
            "duration": {"seconds": 0},
            "evaluation_interval": ALIGNMENT,
        },
    }


def tier_policies(tier: str, channels=()) -> list[dict]:
    """The alert policies of a tier, as ``AlertPolicy`` mappings."""
    types = tier_types(tier)
    if not types:
        return []
    goals = slo.objectives(TIERS[tier])
    jobs = [job_name(t) for t in types]
    jobs_regex = _jobs_regex(jobs)
    window = goals.rate_window_seconds
    backlog = [
        _above(
            f"Oldest unacked message on a delivery subscription older than {goals.max_backlog_age_seconds} s",
            _subscriptions_filter(OLDEST_UNACKED_AGE, [t.subscription for t in types]),
            goals.max_backlog_age_seconds,
            goals.breach_for_seconds,
            "resource.label.subscription_id",
        )
    ]
    backlog.append(
        _above(
            f"Oldest unacked message on an auditor's subscription older than {goals.max_backlog_age_seconds} s",
            _subscriptions_filter(OLDEST_UNACKED_AGE, [auditor_subscription(t) for t in types]),
            goals.max_backlog_age_seconds,
            goals.breach_for_seconds,
            "resource.label.subscription_id",
        )
    )
    lag = [
        _above(
            f"{label} above {goals.max_watermark_lag_seconds} s",
            _jobs_filter(metric, jobs),
            goals.max_watermark_lag_seconds,
            goals.breach_for_seconds,
            "resource.label.job_name",
        )
        for label, metric in (("Data watermark age", WATERMARK_AGE), ("System lag", SYSTEM_LAG))
    ]
    stopped = [
        _above("Job failed", _jobs_filter(IS_FAILED, jobs), 0, 0, "resource.label.job_name"),
        {
            "display_name": f"Job reported no workers for {goals.not_running_after_seconds} s",
            "condition_absent": {
                "filter": _jobs_filter(VCPUS, jobs),
                "aggregations": [
                    {
                        "alignment_period": ALIGNMENT,
                        "per_series_aligner": "ALIGN_MAX",
                        "cross_series_reducer": "REDUCE_COUNT",
                        "group_by_fields": ["resource.label.job_name"],
                    }
                ],
                "duration": {"seconds": goals.not_running_after_seconds},
                "trigger": {"count": 1},
            },
        },
    ]
    rate = goals.max_dead_letter_rate
    overdue = _increase(_counter(jobs_regex, slo.HOURS_OVERDUE), window)
    return [
        _policy(
            tier,
            "backlog",
            backlog,
            "Messages wait unacknowledged on a subscription: its job is stalled, too slow, or not reading.",
            "backlog-oldest-unacked-message",
            channels,
        ),
        _policy(
            tier,
            "lag",
            lag,
            "The job's watermark falls behind: its hours will close after their deadline.",
            "lag-data-watermark-or-system-lag",
            channels,
        ),
        _policy(
            tier,
            "dead-letter rate",
            [
                _promql(
                    f"Dead-letter rate over the last hour above {rate:g}",
                    f"{_dead_letter_rate(jobs_regex, window)} > {rate!r}",
                )
            ],
            f"More than {rate:g} of a job's messages were dead-lettered in the last hour.",
            "dead-letter-rate",
            channels,
        ),
        _policy(
            tier,
            "hours overdue",
            [_promql("An hour closed after its deadline in the last hour", f"{overdue} > 0")],
            f"An hour's _SUCCESS was written more than {goals.close_delay_budget_seconds} s after the hour's end.",
            "hours-overdue",
            channels,
        ),
        _policy(
            tier,
            "not running",
            stopped,
            "A delivery job failed or stopped reporting: its type is not being delivered.",
            "job-not-running",
            channels,
        ),
    ]


def lost_policy(channels=()) -> dict:
    """One policy for every tier: lost = 0 is every tier's objective, and an auditor may count
    several types. It watches every job of this system (named ``events-...``)."""
    lost = _increase(_counter(ALL_JOBS, slo.LOST), slo.objectives(TIERS["high"]).rate_window_seconds)
    return _policy(
        "all",
        "data lost",
        [_promql("An auditor counted lost messages in the last hour", f"{lost} > 0")],
        "Messages were published that are in no output: not delivered, duplicate, late or dead-lettered.",
        "data-lost",
        channels,
    )


def alert_policies(tiers=None, channels=()):
    """Every policy, as ``monitoring_v3.AlertPolicy``: the tiers' in recovery order, then data lost."""
    from google.cloud import monitoring_v3

    mappings = [p for tier in _ordered_tiers(tiers) for p in tier_policies(tier, channels)]
    mappings.append(lost_policy(channels))
    return [monitoring_v3.AlertPolicy(mapping) for mapping in mappings]


# Dashboards.


def _chart(title: str, query: dict, thresholds=()) -> dict:
    return {
        "title": title,
        "xy_chart": {
            "data_sets": [{"time_series_query": query, "plot_type": "LINE"}],
            "thresholds": [
                {"label": label, "value": value, "color": "RED", "direction": "ABOVE"} for label, value in thresholds
            ],
        },
    }


def _max_by(filter_: str, group_by: str) -> dict:
    return {
        "time_series_filter": {
            "filter": filter_,
            "aggregation": {
                "alignment_period": ALIGNMENT,
                "per_series_aligner": "ALIGN_MAX",
                "cross_series_reducer": "REDUCE_MAX",
                "group_by_fields": [group_by],
            },
        }
    }


def tier_dashboard(tier: str) -> dict:
    """The tier's dashboard, as a ``Dashboard`` mapping: a tile per SLI, its objective drawn in red."""
    types = tier_types(tier)
    goals = slo.objectives(TIERS[tier])
    jobs = [job_name(t) for t in types]
    jobs_regex = _jobs_regex(jobs)
    window = goals.rate_window_seconds
    outcomes = "|".join([slo.RECEIVED, slo.DELIVERED, slo.DUPLICATES, slo.LATE, f"{slo.DEAD_LETTERED_PREFIX}.+"])
    subscriptions = [t.subscription for t in types]
    subscriptions += [auditor_subscription(t) for t in types]
    widgets = [
        _chart(
            "Oldest unacked message (s), per subscription",
            _max_by(_subscriptions_filter(OLDEST_UNACKED_AGE, subscriptions), "resource.label.subscription_id"),
            [("alert", goals.max_backlog_age_seconds)],
        ),
        _chart(
            "Data watermark age (s), per job",
            _max_by(_jobs_filter(WATERMARK_AGE, jobs), "resource.label.job_name"),
            [("alert", goals.max_watermark_lag_seconds)],
        ),
        _chart(
            "System lag (s), per job",
            _max_by(_jobs_filter(SYSTEM_LAG, jobs), "resource.label.job_name"),
            [("alert", goals.max_watermark_lag_seconds)],
        ),
        _chart(
            "Close delay (s): marker time - hour end, longest per job",
            _max_by(_jobs_filter(USER_COUNTER, jobs, [slo.CLOSE_DELAY_SECONDS + "_MAX"]), "resource.label.job_name"),
            [("deadline", goals.close_delay_budget_seconds)],
        ),
        _chart(
            "Messages in the last hour, by outcome (dead letters by kind)",
            {"prometheus_query": _increase(_counter(jobs_regex, outcomes), window, by="metric_name")},
        ),
        _chart(
            "Dead-letter rate over the last hour, per job",
            {"prometheus_query": _dead_letter_rate(jobs_regex, window)},
            [("objective", goals.max_dead_letter_rate)],
        ),
        _chart(
            "Late rate over the last hour, per job",
            {
                "prometheus_query": f"{_increase(_counter(jobs_regex, slo.LATE), window)} / "
                f"{_increase(_counter(jobs_regex, slo.RECEIVED), window)}"
            },
        ),
        _chart(
            "Hours closed and overdue in the last hour",
            {
                "prometheus_query": _increase(
                    _counter(jobs_regex, f"{slo.HOURS_CLOSED}|{slo.HOURS_OVERDUE}"), window, by="job_name, metric_name"
                )
            },
        ),
        _chart(
            "Lost in the last hour, per auditor job (every tier)",
            {"prometheus_query": _increase(_counter(ALL_JOBS, slo.LOST), window)},
            [("objective", 0)],
        ),
        _chart("Failed jobs", _max_by(_jobs_filter(IS_FAILED, jobs), "resource.label.job_name"), [("failed", 0)]),
    ]
    width, height = 24, 16
    tiles = [
        {"x_pos": (i % 2) * width, "y_pos": (i // 2) * height, "width": width, "height": height, "widget": widget}
        for i, widget in enumerate(widgets)
    ]
    return {"display_name": display_name(tier, "dashboard"), "mosaic_layout": {"columns": 48, "tiles": tiles}}


def dashboards(tiers=None):
    """One ``monitoring_dashboard_v1.Dashboard`` per tier that has types, in recovery order."""
    from google.cloud import monitoring_dashboard_v1

    return [monitoring_dashboard_v1.Dashboard(tier_dashboard(t)) for t in _ordered_tiers(tiers) if tier_types(t)]


# Output and applying.


def as_json(message) -> dict:
    """A policy or dashboard in its REST form (camelCase, enum names), as gcloud reads it."""
    return json.loads(
        type(message).to_json(message, use_integers_for_enums=False, always_print_fields_with_no_presence=False)
    )


def apply_policies(client, project: str, policies) -> list[str]:
    """Creates each policy, or updates the one with its display name; returns what it did."""
    parent = f"projects/{project}"
    existing: dict[str, list] = {}
    for found in client.list_alert_policies(name=parent):
        existing.setdefault(found.display_name, []).append(found)
    done = []
    for policy in policies:
        same_name = existing.get(policy.display_name, [])
        if same_name:
            policy = type(policy)(policy)
            policy.name = same_name[0].name
            client.update_alert_policy(alert_policy=policy)
            done.append(f"updated alert policy {policy.display_name!r}")
            if len(same_name) > 1:
                others = ", ".join(p.name for p in same_name[1:])
                done.append(f"  note: {len(same_name) - 1} more with that name, left as they are: {others}")
        else:
            created = client.create_alert_policy(name=parent, alert_policy=policy)
            done.append(f"created alert policy {policy.display_name!r} ({created.name})")
    return done


def apply_dashboards(client, project: str, boards) -> list[str]:
    """Creates each dashboard, or updates the one with its display name; returns what it did."""
    parent = f"projects/{project}"
    existing = {}
    for found in client.list_dashboards(parent=parent):
        existing.setdefault(found.display_name, found)
    done = []
    for board in boards:
        found = existing.get(board.display_name)
        if found is not None:
            board = type(board)(board)
            board.name, board.etag = found.name, found.etag
            client.update_dashboard(request={"dashboard": board})
            done.append(f"updated dashboard {board.display_name!r}")
        else:
            created = client.create_dashboard(request={"parent": parent, "dashboard": board})
            done.append(f"created dashboard {board.display_name!r} ({created.name})")
    return done


def _clients():
    from google.cloud import monitoring_dashboard_v1, monitoring_v3

    return monitoring_v3.AlertPolicyServiceClient(), monitoring_dashboard_v1.DashboardsServiceClient()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--project", help="The project whose Cloud Monitoring gets them; required unless --dry_run.")
    parser.add_argument(
        "--tier",
        action="append",
        choices=_ordered_tiers(),
        help="Only this tier's policies and dashboard (repeatable; default: every tier). Data lost is always included.",
    )
    parser.add_argument(
        "--notification_channel",
        action="append",
        default=[],
        help="A notification channel every policy notifies: projects/<project>/notificationChannels/<id> (repeatable).",
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="Print the policies and dashboards as one JSON document instead; needs no project and no credentials.",
    )
    args = parser.parse_args(argv)
    if not args.dry_run and not args.project:
        parser.error("--project is required to apply the policies (or print them with --dry_run)")
    policies = alert_policies(args.tier, args.notification_channel)
    boards = dashboards(args.tier)
    if args.dry_run:
        document = {"alert_policies": [as_json(p) for p in policies], "dashboards": [as_json(d) for d in boards]}
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    from google.api_core import exceptions
    from google.auth import exceptions as auth_exceptions

    with preflight.exit_on_failure(PROG):
        preflight.check_credentials(None, "Cloud Monitoring")
    try:
        alert_client, dashboard_client = _clients()
        done = apply_policies(alert_client, args.project, policies)
        done += apply_dashboards(dashboard_client, args.project, boards)
    except (exceptions.GoogleAPICallError, exceptions.RetryError, auth_exceptions.GoogleAuthError) as error:
        preflight.fail(PROG, f"Cloud Monitoring in project {args.project}: {getattr(error, 'message', error)}")
    print("\n".join(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The alert policies of each tier, and the one of lost data for every tier, as ``AlertPolicy`` mappings.

For each tier they watch the subscriptions and jobs of its types, with the thresholds of
``event_delivery.contract.slo``: backlog, lag, dead-letter rate, hours overdue, not
running; and, for every tier alike, data lost. Each policy's documentation names its
section of the runbook (``RUNBOOK``).
"""

from __future__ import annotations

from event_delivery.contract import slo
from event_delivery.contract.counts import auditor_subscription
from event_delivery.contract.registry import TIERS, EventType, tier_types
from tools.ops.job_flags import job_name
from tools.ops.monitoring_queries import (
    ALIGNMENT,
    ALL_JOBS,
    IS_FAILED,
    OLDEST_UNACKED_AGE,
    SYSTEM,
    SYSTEM_LAG,
    VCPUS,
    WATERMARK_AGE,
    counter,
    dead_letter_rate,
    display_name,
    increase,
    jobs_filter,
    jobs_regex,
    ordered_tiers,
    subscriptions_filter,
)

RUNBOOK = "docs/operations.md"
SEVERITY = {"high": "CRITICAL", "normal": "ERROR", "low": "WARNING"}

# What each policy's documentation says it means.
BACKLOG = "Messages wait unacknowledged on a subscription: its job is stalled, too slow, or not reading."
LAG = "The job's watermark falls behind: its hours will close after their deadline."
DEAD_LETTERS = "More than {rate:g} of a job's messages were dead-lettered in the last hour."
OVERDUE = "An hour's _SUCCESS was written more than {budget} s after the hour's end."
NOT_RUNNING = "A delivery job failed or stopped reporting: its type is not being delivered."


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


def _backlog(types: list[EventType], goals: slo.Objectives) -> list[dict]:
    """The oldest unacked message, on the delivery subscriptions and on the auditors'."""
    age = goals.max_backlog_age_seconds
    subscriptions = {"a delivery subscription": [t.subscription for t in types]}
    subscriptions["an auditor's subscription"] = [auditor_subscription(t) for t in types]
    return [
        _above(
            f"Oldest unacked message on {what} older than {age} s",
            subscriptions_filter(OLDEST_UNACKED_AGE, names),
            age,
            goals.breach_for_seconds,
            "resource.label.subscription_id",
        )
        for what, names in subscriptions.items()
    ]


def _lag(jobs: list[str], goals: slo.Objectives) -> list[dict]:
    return [
        _above(
            f"{label} above {goals.max_watermark_lag_seconds} s",
            jobs_filter(metric, jobs),
            goals.max_watermark_lag_seconds,
            goals.breach_for_seconds,
            "resource.label.job_name",
        )
        for label, metric in (("Data watermark age", WATERMARK_AGE), ("System lag", SYSTEM_LAG))
    ]


def _not_running(jobs: list[str], goals: slo.Objectives) -> list[dict]:
    """A failed job, or one that reported no workers for too long."""
    return [
        _above("Job failed", jobs_filter(IS_FAILED, jobs), 0, 0, "resource.label.job_name"),
        {
            "display_name": f"Job reported no workers for {goals.not_running_after_seconds} s",
            "condition_absent": {
                "filter": jobs_filter(VCPUS, jobs),
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


def tier_policies(tier: str, channels=()) -> list[dict]:
    """The alert policies of a tier, as ``AlertPolicy`` mappings."""
    types = tier_types(tier)
    if not types:
        return []
    goals = slo.objectives(TIERS[tier])
    jobs = [job_name(t) for t in types]
    regex, window, rate = jobs_regex(jobs), goals.rate_window_seconds, goals.max_dead_letter_rate
    overdue = increase(counter(regex, slo.HOURS_OVERDUE), window)
    dead_letters = _promql(
        f"Dead-letter rate over the last hour above {rate:g}", f"{dead_letter_rate(regex, window)} > {rate!r}"
    )
    policies = (
        ("backlog", _backlog(types, goals), BACKLOG, "backlog-oldest-unacked-message"),
        ("lag", _lag(jobs, goals), LAG, "lag-data-watermark-or-system-lag"),
        ("dead-letter rate", [dead_letters], DEAD_LETTERS.format(rate=rate), "dead-letter-rate"),
        (
            "hours overdue",
            [_promql("An hour closed after its deadline in the last hour", f"{overdue} > 0")],
            OVERDUE.format(budget=goals.close_delay_budget_seconds),
            "hours-overdue",
        ),
        ("not running", _not_running(jobs, goals), NOT_RUNNING, "job-not-running"),
    )
    return [
        _policy(tier, title, conditions, summary, anchor, channels) for title, conditions, summary, anchor in policies
    ]


def lost_policy(channels=()) -> dict:
    """One policy for every tier: lost = 0 is every tier's objective, and an auditor may count
    several types. It watches every job of this system (named ``events-...``)."""
    lost = increase(counter(ALL_JOBS, slo.LOST), slo.objectives(TIERS["high"]).rate_window_seconds)
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

    mappings = [p for tier in ordered_tiers(tiers) for p in tier_policies(tier, channels)]
    mappings.append(lost_policy(channels))
    return [monitoring_v3.AlertPolicy(mapping) for mapping in mappings]

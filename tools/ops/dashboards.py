"""One Cloud Monitoring dashboard per tier, as a ``Dashboard`` mapping: a tile per SLI, its
objective drawn in red."""

from __future__ import annotations

from event_delivery.contract import slo
from event_delivery.contract.counts import auditor_subscription
from event_delivery.contract.registry import TIERS, tier_types
from tools.ops.job_flags import job_name
from tools.ops.monitoring_queries import (
    ALIGNMENT,
    ALL_JOBS,
    IS_FAILED,
    OLDEST_UNACKED_AGE,
    SYSTEM_LAG,
    USER_COUNTER,
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


def _lag_widgets(tier: str) -> list[dict]:
    """Backlog, watermark, system lag and close delay: how far behind the tier's jobs are."""
    types, goals = tier_types(tier), slo.objectives(TIERS[tier])
    jobs = [job_name(t) for t in types]
    subscriptions = [t.subscription for t in types] + [auditor_subscription(t) for t in types]
    close_delay = jobs_filter(USER_COUNTER, jobs, [slo.CLOSE_DELAY_SECONDS + "_MAX"])
    return [
        _chart(
            "Oldest unacked message (s), per subscription",
            _max_by(subscriptions_filter(OLDEST_UNACKED_AGE, subscriptions), "resource.label.subscription_id"),
            [("alert", goals.max_backlog_age_seconds)],
        ),
        _chart(
            "Data watermark age (s), per job",
            _max_by(jobs_filter(WATERMARK_AGE, jobs), "resource.label.job_name"),
            [("alert", goals.max_watermark_lag_seconds)],
        ),
        _chart(
            "System lag (s), per job",
            _max_by(jobs_filter(SYSTEM_LAG, jobs), "resource.label.job_name"),
            [("alert", goals.max_watermark_lag_seconds)],
        ),
        _chart(
            "Close delay (s): marker time - hour end, longest per job",
            _max_by(close_delay, "resource.label.job_name"),
            [("deadline", goals.close_delay_budget_seconds)],
        ),
    ]


def _outcome_widgets(tier: str) -> list[dict]:
    """What became of the messages in the last hour, the rates, the hours closed, lost, and failed jobs."""
    goals = slo.objectives(TIERS[tier])
    jobs = [job_name(t) for t in tier_types(tier)]
    regex, window = jobs_regex(jobs), goals.rate_window_seconds
    outcomes = "|".join([slo.RECEIVED, slo.DELIVERED, slo.DUPLICATES, slo.LATE, f"{slo.DEAD_LETTERED_PREFIX}.+"])
    late_rate = f"{increase(counter(regex, slo.LATE), window)} / {increase(counter(regex, slo.RECEIVED), window)}"
    hours = counter(regex, f"{slo.HOURS_CLOSED}|{slo.HOURS_OVERDUE}")
    return [
        _chart(
            "Messages in the last hour, by outcome (dead letters by kind)",
            {"prometheus_query": increase(counter(regex, outcomes), window, by="metric_name")},
        ),
        _chart(
            "Dead-letter rate over the last hour, per job",
            {"prometheus_query": dead_letter_rate(regex, window)},
            [("objective", goals.max_dead_letter_rate)],
        ),
        _chart("Late rate over the last hour, per job", {"prometheus_query": late_rate}),
        _chart(
            "Hours closed and overdue in the last hour",
            {"prometheus_query": increase(hours, window, by="job_name, metric_name")},
        ),
        _chart(
            "Lost in the last hour, per auditor job (every tier)",
            {"prometheus_query": increase(counter(ALL_JOBS, slo.LOST), window)},
            [("objective", 0)],
        ),
        _chart("Failed jobs", _max_by(jobs_filter(IS_FAILED, jobs), "resource.label.job_name"), [("failed", 0)]),
    ]


def tier_dashboard(tier: str) -> dict:
    """The tier's dashboard, as a ``Dashboard`` mapping: a tile per SLI, its objective drawn in red."""
    width, height = 24, 16
    tiles = [
        {"x_pos": (i % 2) * width, "y_pos": (i // 2) * height, "width": width, "height": height, "widget": widget}
        for i, widget in enumerate(_lag_widgets(tier) + _outcome_widgets(tier))
    ]
    return {"display_name": display_name(tier, "dashboard"), "mosaic_layout": {"columns": 48, "tiles": tiles}}


def dashboards(tiers=None):
    """One ``monitoring_dashboard_v1.Dashboard`` per tier that has types, in recovery order."""
    from google.cloud import monitoring_dashboard_v1

    return [monitoring_dashboard_v1.Dashboard(tier_dashboard(t)) for t in ordered_tiers(tiers) if tier_types(t)]

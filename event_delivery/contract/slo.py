"""Service levels: what each tier promises per type and hour, and the metrics that measure it.

The SLIs, per type and hour:

- **timeliness**: the close delay, the wall-clock time the hour's ``_SUCCESS`` was written
  minus the hour's end; the hour is overdue when it exceeds the tier's budget (allowed
  lateness + close margin);
- **completeness**: lost = published (auditor) - (delivered + duplicates + late +
  dead-lettered), which must be 0;
- **dead-letter rate**: dead-lettered / in, at most the tier's ``max_dead_letter_rate``;
- **late rate**: late / in (watched, with no objective of its own).

The jobs carry them as Beam metrics with the names below. On Dataflow every user metric
reaches Cloud Monitoring as ``dataflow.googleapis.com/job/user_counter`` with the name in
its ``metric_name`` label (the namespace is not in it, so a name means one thing in every
job), and a distribution as four such series, ``<name>_MAX``, ``_MIN``, ``_MEAN`` and
``_COUNT``. The names are an interface: the alert policies and dashboards
(``tools.ops.alerts``, ``tools.ops.dashboards``) select them, so
renaming one silences an alert.
``tests/unit/test_monitoring.py`` fails when a name selected here is registered by no job.
"""

from __future__ import annotations

import dataclasses

from event_delivery.contract.partitions import HOUR_SECONDS
from event_delivery.contract.registry import Tier

NAMESPACE = "delivery"  # the delivery job's metrics
AUDIT_NAMESPACE = "audit"  # the auditor's metrics

# Counters of the delivery job (namespace ``delivery``).
RECEIVED = "in"  # every message parsed, whatever became of it
DELIVERED = "delivered"  # records published into closed hours
DUPLICATES = "duplicates"  # repeats dropped
LATE = "late"  # records written to the late root
DEAD_LETTERED_PREFIX = "dead_lettered_"  # one counter per error kind: dead_lettered_<kind>
HOURS_CLOSED = "closed_hours"  # markers written
HOURS_OVERDUE = "hours_overdue"  # markers written after the hour's close deadline
# Distribution of the delivery job: marker time - hour end, in seconds, one value per hour closed.
CLOSE_DELAY_SECONDS = "close_delay_seconds"

# Counters of the auditor job (namespace ``audit``).
PUBLISHED = "published"  # messages counted on the audit source
LOST = "lost"  # messages of checked hours that are in no output (the hour's lost, when it is > 0)

DISTRIBUTION_SUFFIXES = ("_MAX", "_MIN", "_MEAN", "_COUNT")  # how Dataflow exports a distribution


def dead_lettered(kind: str) -> str:
    """The counter of the messages dead-lettered with an error kind (an ``ErrorKind`` value)."""
    return f"{DEAD_LETTERED_PREFIX}{kind}"


def close_delay_budget_seconds(tier: Tier, allowed_lateness_seconds: int | None = None) -> int:
    """Seconds after an hour's end by which its marker must be written.

    The tier's allowed lateness plus its close margin; a job run with another
    ``--allowed_lateness_seconds`` (a local run) closes by that one plus the same margin.
    """
    lateness = tier.allowed_lateness_seconds if allowed_lateness_seconds is None else allowed_lateness_seconds
    return lateness + tier.close_margin_seconds


def is_overdue(tier: Tier, close_delay_seconds: float, allowed_lateness_seconds: int | None = None) -> bool:
    """Whether an hour closed ``close_delay_seconds`` after its end missed its deadline."""
    return close_delay_seconds > close_delay_budget_seconds(tier, allowed_lateness_seconds)


def _whole_minutes(seconds: float) -> int:
    return max(60, -(-int(seconds) // 60) * 60)


@dataclasses.dataclass(frozen=True)
class Objectives:
    """A tier's service levels and the alert thresholds derived from them, all in seconds.

    Everything that delays a close eats into the tier's close margin: an hour closes
    when the watermark passes its end plus the allowed lateness, so a watermark lag of
    the whole margin makes every hour late. The lag alerts therefore fire at half the
    margin, held for a fifth of it, which leaves the on-call at least 30% of the margin
    to act before the tier's hours are overdue. A higher tier has the smaller margin,
    so its alerts are stricter.
    """

    tier: str
    close_delay_budget_seconds: int  # after the hour's end
    max_dead_letter_rate: float
    max_lost: int
    max_backlog_age_seconds: int  # oldest unacked message on the type's subscriptions
    max_watermark_lag_seconds: int  # data watermark age and system lag of the job
    breach_for_seconds: int  # how long a lag must last before it pages
    not_running_after_seconds: int  # how long a job may report nothing
    rate_window_seconds: int  # the window of the rates: an hour, the unit of the SLIs


def objectives(tier: Tier) -> Objectives:
    margin = tier.close_margin_seconds
    return Objectives(
        tier=tier.name,
        close_delay_budget_seconds=close_delay_budget_seconds(tier),
        max_dead_letter_rate=tier.max_dead_letter_rate,
        max_lost=0,
        max_backlog_age_seconds=margin // 2,
        max_watermark_lag_seconds=margin // 2,
        breach_for_seconds=_whole_minutes(margin / 5),
        not_running_after_seconds=_whole_minutes(margin / 2),
        rate_window_seconds=HOUR_SECONDS,
    )

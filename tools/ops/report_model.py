"""The report's model: each type's hours as the audit counted and judged them, with its tier.

``collect`` reads it from a storage root (``audit_type``); everything else of the report
draws it, with no I/O.
"""

from __future__ import annotations

import collections
import dataclasses

from event_delivery.contract import slo
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import Tier, load_registry
from tools.ops.audit_model import HourAudit
from tools.ops.audit_scan import audit_type

OUTCOMES = ("delivered", "duplicates", "late", "dead_lettered")


@dataclasses.dataclass(frozen=True)
class TypeReport:
    event_type: str
    tier: Tier
    window_seconds: int
    hours: tuple[HourAudit, ...]  # judged overdue or not by the audit (``slo.is_overdue``)
    dead_letter_kinds: dict[str, int]
    problems: tuple[str, ...] = ()

    @property
    def close_budget_seconds(self) -> int:
        """How long after its end an hour may take to close."""
        return slo.close_delay_budget_seconds(self.tier)

    def total(self, name: str) -> int | None:
        """Over the hours that know it (the auditor's counts, lost once closed); None if none does."""
        values = [getattr(hour, name) for hour in self.hours if getattr(hour, name) is not None]
        return sum(values) if values else None

    @property
    def on_time(self) -> int:
        return sum(hour.closed and not hour.overdue for hour in self.hours)

    @property
    def worst_dead_letter_rate(self) -> float:
        return max((hour.dead_letter_rate for hour in self.hours), default=0.0)

    def slo(self, metric: str, hour: HourAudit | None = None) -> str:
        """``ok``, ``bad`` or ``unknown`` (no hours, or no counts of a closed hour): the cell's
        colour, for the type or for one hour."""
        hours = self.hours if hour is None else (hour,)
        if not hours:
            return "unknown"
        if metric == "close_delay":
            return "bad" if any(h.overdue for h in hours) else "ok"
        if metric == "lost":
            lost = [h.lost for h in hours if h.lost is not None]
            return "bad" if any(lost) else "ok" if lost else "unknown"
        if metric == "dead_letter_rate":
            worst = max((h.dead_letter_rate for h in hours), default=0.0)
            return "bad" if worst > self.tier.max_dead_letter_rate else "ok"
        raise ValueError(metric)


def collect(storage_root: str, event_type: str, window_seconds: int, now: float | None = None) -> TypeReport:
    """A type's report from its files, manifests and auditor counts under ``storage_root``
    (as ``audit_type`` joins and judges them at ``now``)."""
    audit = audit_type(Layout.under(storage_root, event_type, window_seconds), now=now)
    hours = tuple(hour for _, hour in sorted(audit.hours.items()))
    kinds = sum((hour.dead_letter_kinds for hour in hours), collections.Counter())
    tier = load_registry()[event_type].tier
    return TypeReport(event_type, tier, window_seconds, hours, dict(kinds), tuple(audit.problems))

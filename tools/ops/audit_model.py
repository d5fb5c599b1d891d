"""The audit's model: each hour's outcomes, the auditor's counts, and how its close went; and
a type's hours, with what is wrong in its output. Filled by ``audit_scan``, shown by ``audit``
and ``report``."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class HourAudit:
    partition: str
    delivered: int = 0
    duplicates: int = 0
    late: int = 0
    dead_lettered: int = 0
    staged: int = 0
    closed: bool = False
    dead_letter_kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    delivered_ids: list = dataclasses.field(default_factory=list)
    published: int | None = None  # the auditor's count of the hour's messages; None without one
    distinct_ids: int | None = None  # the auditor's count of their distinct event ids
    close_delay_seconds: float | None = None  # when the marker was written minus the hour's end
    open_for_seconds: float | None = None  # not closed: how long since the hour's end, at the audit's time
    counts_source: str | None = None  # where the auditor counted: subscription or producer_counts
    overdue: bool = False  # no marker past the close deadline, or one written after it (``slo.is_overdue``)

    @property
    def total(self) -> int:
        return self.delivered + self.duplicates + self.late + self.dead_lettered

    @property
    def lost(self) -> int | None:
        """Published messages in no output; None until the hour has the auditor's count and its marker.

        Negative when the outputs hold more than was published (a message written twice).
        """
        if self.published is None or not self.closed:
            return None
        return self.published - self.total

    @property
    def close_delay_so_far(self) -> float | None:
        """The close delay; for an hour still open, how long it has been over so far (None before its end)."""
        return self.close_delay_seconds if self.closed else self.open_for_seconds

    @property
    def dead_letter_rate(self) -> float:
        """Of what was published (by the auditor), or of what was accounted for without its count."""
        base = self.published if self.published is not None else self.total
        return self.dead_lettered / base if base else 0.0

    @property
    def failures(self) -> list[str]:
        """Why this hour fails the audit: data lost, or the close overdue."""
        reasons = [f"lost {self.lost}"] if self.lost else []
        return reasons + (["overdue"] if self.overdue else [])


@dataclasses.dataclass
class TypeAudit:
    event_type: str
    hours: dict = dataclasses.field(default_factory=dict)
    problems: list = dataclasses.field(default_factory=list)

    def hour(self, partition: str) -> HourAudit:
        return self.hours.setdefault(partition, HourAudit(partition))

    def total(self, name: str) -> int:
        return sum(getattr(hour, name) for hour in self.hours.values())

    @property
    def closed_hours(self) -> int:
        return sum(hour.closed for hour in self.hours.values())

    @property
    def settled(self) -> bool:
        """Every hour with delivered data has closed and nothing waits in staging."""
        return all(hour.closed or not hour.delivered for hour in self.hours.values()) and not self.total("staged")

    @property
    def reconciled(self) -> bool:
        """Every closed hour that has output or a count has the auditor's count, and its messages
        are all accounted for (lost = 0). A closed hour with neither had nothing to lose."""
        checked = [h for h in self.hours.values() if h.closed and (h.total or h.published is not None)]
        return all(hour.lost == 0 for hour in checked)

    @property
    def failed_hours(self) -> dict[str, list[str]]:
        """The hours that lost data or are overdue, with why."""
        return {p: hour.failures for p, hour in sorted(self.hours.items()) if hour.failures}

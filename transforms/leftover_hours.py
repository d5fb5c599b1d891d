"""At start, the hours that drained or stopped runs left open, handed to ``CloseHour``.

A run's state does not survive it, but its files do: the hours it left staged files or a
saved plan for are announced once, stamped in the hour, so that ``CloseHour`` closes them
with this run's files, or clears up after them if their marker is written.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.transforms.window import TimestampedValue

from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions
from transforms.declared_types import ANY_OUTPUT
from transforms.hours import hour_windows
from transforms.publish import CLOSE_PLAN
from transforms.reports import LEFT_OVER, report


@ANY_OUTPUT
class AnnounceLeftoverHoursFn(beam.DoFn):
    """At start, one ``left_over`` report per hour that other runs left staged files or a plan
    for, stamped in the hour, so that ``CloseHour`` closes it; or, if the hour has its marker
    (a run stopped while it finished the hour, or before it moved a file staged after the
    close), clears up after it."""

    def __init__(self, settings):
        self.layout = settings.layout
        self.run_id = settings.run_id

    def setup(self):
        use_emulator_credentials()

    def process(self, _):
        staged = partitions.staged_by_other_runs(self.layout, self.run_id)
        planned = partitions.staged_by_other_runs(self.layout, self.run_id, CLOSE_PLAN)
        for hour_start in sorted(staged.keys() | planned.keys()):
            yield TimestampedValue(report(LEFT_OVER, 0), hour_start)


class AnnounceLeftoverHours(beam.PTransform):
    """Hours that a drained or stopped run left open, as hour reports for ``CloseHour``."""

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def expand(self, pipeline):
        s = self.settings
        return (
            pipeline
            | "Start" >> beam.Impulse()
            | "FindLeftoverHours" >> beam.ParDo(AnnounceLeftoverHoursFn(s))
            | "IntoHours" >> hour_windows(s)
        )

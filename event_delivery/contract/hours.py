"""The contract's hours as Beam windows, for every job that counts or delivers by hour.

An hour (a bucket of ``window_seconds``) stays open for its allowed lateness after it
ends, so its window is ``[bucket start, bucket end + allowed lateness)``: the watermark
passes the window's end exactly when the contract closes the hour.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.transforms import trigger, window
from apache_beam.utils.timestamp import Duration, Timestamp


class HourWindows(window.NonMergingWindowFn):
    """Assigns each element to ``[bucket start, bucket end + allowed lateness)``."""

    def __init__(self, window_seconds: int, allowed_lateness_seconds: int):
        self.window_seconds = window_seconds
        self.allowed_lateness_seconds = allowed_lateness_seconds
        self._recent = {}  # bucket start (micros) -> its window, built once: most events fall into a few hours

    def assign(self, context):
        micros = context.timestamp.micros
        size = self.window_seconds * 1_000_000
        start = micros - micros % size
        assigned = self._recent.get(start)
        if assigned is None:
            if len(self._recent) > 1_000:
                self._recent.clear()
            end = start + size + self.allowed_lateness_seconds * 1_000_000
            assigned = self._recent[start] = window.IntervalWindow(Timestamp(micros=start), Timestamp(micros=end))
        return [assigned]

    def __getstate__(self):
        return {**self.__dict__, "_recent": {}}

    def get_window_coder(self):
        return coders.IntervalWindowCoder()

    def __eq__(self, other):
        return type(self) is type(other) and (self.window_seconds, self.allowed_lateness_seconds) == (
            other.window_seconds,
            other.allowed_lateness_seconds,
        )

    def __hash__(self):
        return hash((type(self), self.window_seconds, self.allowed_lateness_seconds))


def into_hours(settings, when=None, accumulating: bool = False) -> beam.WindowInto:
    """Into the hour windows of ``settings`` (anything with ``window_seconds``,
    ``allowed_lateness_seconds`` and ``late_horizon_seconds``: the delivery job's settings
    and the auditor's), firing by ``when`` (default: once, when the hour closes)."""
    mode = trigger.AccumulationMode.ACCUMULATING if accumulating else trigger.AccumulationMode.DISCARDING
    return beam.WindowInto(
        HourWindows(settings.window_seconds, settings.allowed_lateness_seconds),
        trigger=when or trigger.DefaultTrigger(),
        accumulation_mode=mode,
        # A message stamped more than one horizon back is dead-lettered by delivery and
        # counted in its arrival's hour by the auditor; the second horizon is slack between
        # arrival and the watermark, so the runner never drops one as too late.
        allowed_lateness=Duration(seconds=2 * settings.late_horizon_seconds),
    )

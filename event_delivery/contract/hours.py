"""The contract's hours as Beam windows, for every job that counts or delivers by hour.

An hour (a bucket of ``window_seconds``) stays open for its allowed lateness after it
ends, so its window is ``[bucket start, bucket end + allowed lateness)``: the watermark
passes the window's end exactly when the contract closes the hour.
"""

from __future__ import annotations

from apache_beam.coders import coders
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp


class HourWindows(window.NonMergingWindowFn):
    """Assigns each element to ``[bucket start, bucket end + allowed lateness)``."""

    def __init__(self, window_seconds: int, allowed_lateness_seconds: int):
        self.window_seconds = window_seconds
        self.allowed_lateness_seconds = allowed_lateness_seconds

    def assign(self, context):
        micros = context.timestamp.micros
        size = self.window_seconds * 1_000_000
        start = micros - micros % size
        end = start + size + self.allowed_lateness_seconds * 1_000_000
        return [window.IntervalWindow(Timestamp(micros=start), Timestamp(micros=end))]

    def get_window_coder(self):
        return coders.IntervalWindowCoder()

    def __eq__(self, other):
        return type(self) is type(other) and (self.window_seconds, self.allowed_lateness_seconds) == (
            other.window_seconds,
            other.allowed_lateness_seconds,
        )

    def __hash__(self):
        return hash((type(self), self.window_seconds, self.allowed_lateness_seconds))

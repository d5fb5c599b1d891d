"""Bucket events into UTC hours and group them into panes per (hour, shard).

The window of an hour spans the hour itself plus its allowed lateness, so the
watermark closes it exactly when the contract says the hour closes: the timers of
``Deduplicate`` and ``CloseHour`` fire at the window's end.
"""

from __future__ import annotations

import typing
import zlib

import apache_beam as beam
from apache_beam.coders import coders
from apache_beam.transforms import trigger, window
from apache_beam.utils.timestamp import Duration, Timestamp


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


def bucket_start_seconds(interval_window) -> int:
    """The start of the hour (bucket) a window belongs to, in epoch seconds."""
    return interval_window.start.micros // 1_000_000


def shard_of(event_id: str, num_shards: int) -> int:
    """A stable shard for an id, the same on every worker (unlike ``hash``)."""
    return zlib.crc32(event_id.encode("utf-8")) % num_shards


def _keyed_by_shard(element, num_shards):
    event_id, received_at_millis, _ = element
    return window.TimestampedValue((shard_of(event_id, num_shards), element), received_at_millis / 1000)


class BucketByHour(beam.PTransform):
    """``(id, received_at_millis, payload)`` in; ``(shard, [elements])`` panes out.

    Every copy of an id lands in the same shard, so deduplication needs no shuffle of
    its own. A pane fires every ``trigger_seconds`` while the hour is open, when it
    closes, and afterwards for stragglers. Which of those a pane is, is decided
    downstream by state, not by the runner's pane label: the Python DirectRunner
    labels panes with a watermark that event timestamps from the past can hold back.
    """

    def __init__(
        self,
        window_seconds: int,
        allowed_lateness_seconds: int,
        trigger_seconds: int | None,
        late_horizon_seconds: int,
        num_shards: int,
    ):
        super().__init__()
        self.windows = HourWindows(window_seconds, allowed_lateness_seconds)
        self.trigger_seconds = trigger_seconds
        self.late_horizon_seconds = late_horizon_seconds
        self.num_shards = num_shards

    def expand(self, elements):
        if self.trigger_seconds is None:  # a bounded input: one pane per hour and shard
            when = trigger.DefaultTrigger()
        else:
            flush = trigger.AfterProcessingTime(self.trigger_seconds)
            when = trigger.AfterWatermark(early=flush, late=flush)
        return (
            elements
            | "StampReceivedAt" >> beam.Map(_keyed_by_shard, self.num_shards).with_output_types(tuple[int, typing.Any])
            | "HourWindows"
            >> beam.WindowInto(
                self.windows,
                trigger=when,
                accumulation_mode=trigger.AccumulationMode.DISCARDING,
                # Parsing dead-letters events older than one horizon on arrival; the
                # second horizon is slack between arrival and the watermark, so the
                # runner never drops an event as too late.
                allowed_lateness=Duration(seconds=2 * self.late_horizon_seconds),
            )
            | "GroupIntoPanes" >> beam.GroupByKey()
        )

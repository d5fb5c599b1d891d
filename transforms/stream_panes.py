"""A stream's panes, gathered in state per (hour, shard, writer): repeats dropped, each pane numbered.

One keyed step does what a grouping (``GroupByKey`` on a trigger) and a stateful
deduplication after it did, so an event's body crosses two keyed shuffles on its way to
its file: ``MarkRepeats`` (by id) and this one. Its state per key is what a grouping's
buffer holds (the events waiting, in a bag) and what the deduplication kept (whether the
hour closed, and the number of the next staged file).

A pane goes out when the bytes waiting reach ``max_pane_bytes`` (Streaming Engine refuses
a value past ~80 MB and a commit past ~180 MB: a work item's commit is its input and at
most one pane more), ``trigger_seconds`` after its first event on the processing-time
clock (or, for a runner with no such clock, after ``trigger_events`` events), and when the
watermark closes the hour. After the close, what arrives goes out the same ways as
``late`` panes. The pane's number is committed with its output, so a retried work item
numbers its panes as the lost try did and the write replaces the same files.

Every pane is stamped at the end of its hour's window, as a grouping stamps its panes, and
the close's timer holds the step's output there until it fires: downstream, the close of
the hour comes after every pane staged for it. The flush timer, on the processing-time
clock, holds the output at its first event's time, as a grouping's buffer does.
"""

from __future__ import annotations

import time
import typing

import apache_beam as beam
from apache_beam.coders import BooleanCoder, FastPrimitivesCoder, TupleCoder, VarIntCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from event_delivery.contract import slo
from transforms import (
    hours,
    timer_holds,  # noqa: F401 - the close timer holds the watermark locally as on Dataflow
)
from transforms.dedup import LATE_PANES, is_repeat, keep_first_copies
from transforms.hours import approximate_bytes, pane_key
from transforms.reports import DUPLICATES, report

wall_clock = time.time  # module-level, so that a test can put it on its TestStream's clock


def _keyed_by_pane(event, window_seconds: int, num_shards: int):
    """``((bucket, shard, writer), event)``: the writer is the worker process this runs in."""
    return pane_key(event, window_seconds, num_shards, hours.writer_id()), event


def _at_the_end_of(window, value) -> WindowedValue:
    """``value`` in ``window``, stamped at its end as a grouping stamps its panes. (A ``TimestampedValue``
    would be windowed anew by its stamp, into the next hour.)"""
    return WindowedValue(value, window.max_timestamp(), (window,))


class GatherPanesFn(beam.DoFn):
    """``((bucket, shard, writer), event)`` in; numbered panes ``((shard, writer, number), [events])``
    out, ``late`` panes ``((shard, writer), [events])`` after the close, and ``duplicates`` reports
    of the repeats dropped (marked by ``MarkRepeats``, or a second copy within a pane)."""

    EVENTS = BagStateSpec("events", FastPrimitivesCoder())
    WAITING = ReadModifyWriteStateSpec("waiting", TupleCoder((VarIntCoder(), VarIntCoder())))  # (events, bytes)
    NUMBER = ReadModifyWriteStateSpec("next_file_number", VarIntCoder())
    CLOSED = ReadModifyWriteStateSpec("closed", BooleanCoder())
    FLUSH = TimerSpec("flush", TimeDomain.REAL_TIME)
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)
    HOLDS_AT_TIMERS = True  # see transforms.timer_holds

    def __init__(self, settings):
        self.max_pane_bytes = settings.max_pane_bytes
        self.trigger_events = settings.trigger_events
        self.trigger = None if settings.trigger_events else Duration(seconds=settings.trigger_seconds)

    def setup(self):
        self.duplicates = beam.metrics.Metrics.counter(slo.NAMESPACE, slo.DUPLICATES)

    def process(
        self,
        keyed_event,
        window=beam.DoFn.WindowParam,
        events=beam.DoFn.StateParam(EVENTS),
        waiting=beam.DoFn.StateParam(WAITING),
        number=beam.DoFn.StateParam(NUMBER),
        closed=beam.DoFn.StateParam(CLOSED),
        flush=beam.DoFn.TimerParam(FLUSH),
        close=beam.DoFn.TimerParam(CLOSE),
    ):
        (_, shard, writer), event = keyed_event
        if is_repeat(event):  # counted, never written: its record did not come along
            yield from self._counted(1, window)
            return
        events.add(event)
        count, size = waiting.read() or (0, 0)
        count, size = count + 1, size + approximate_bytes(event)
        full = size >= self.max_pane_bytes or (self.trigger_events and count >= self.trigger_events)
        if count == 1:
            # The close's timer, once more after the close: it fires at once, and the late events of
            # the work item go out as one pane. A flush timer would hold the output at their old time.
            close.set(window.max_timestamp())
            if self.trigger and not closed.read():
                flush.set(Timestamp(wall_clock()) + self.trigger)
        if full:
            yield from self._pane(shard, writer, window, events, waiting, number, closed)
        else:
            waiting.write((count, size))

    @on_timer(FLUSH)
    def on_the_clock(
        self,
        key=beam.DoFn.KeyParam,
        window=beam.DoFn.WindowParam,
        events=beam.DoFn.StateParam(EVENTS),
        waiting=beam.DoFn.StateParam(WAITING),
        number=beam.DoFn.StateParam(NUMBER),
        closed=beam.DoFn.StateParam(CLOSED),
    ):
        _, shard, writer = key
        yield from self._pane(shard, writer, window, events, waiting, number, closed)

    @on_timer(CLOSE)
    def on_the_close(
        self,
        key=beam.DoFn.KeyParam,
        window=beam.DoFn.WindowParam,
        events=beam.DoFn.StateParam(EVENTS),
        waiting=beam.DoFn.StateParam(WAITING),
        number=beam.DoFn.StateParam(NUMBER),
        closed=beam.DoFn.StateParam(CLOSED),
        flush=beam.DoFn.TimerParam(FLUSH),
    ):
        _, shard, writer = key
        yield from self._pane(shard, writer, window, events, waiting, number, closed)
        if not closed.read():
            closed.write(True)
            flush.clear()  # nothing waits for it, and it would hold a drain until it fires

    def _pane(self, shard, writer, window, events, waiting, number, closed):
        """What waits, as one pane: staged under the next number while the hour is open, else late."""
        waited = list(events.read())
        if not waited:
            return
        events.clear()
        waiting.clear()
        unique = keep_first_copies(waited, set())
        yield from self._counted(len(waited) - len(unique), window)
        if closed.read():
            yield beam.pvalue.TaggedOutput(LATE_PANES, _at_the_end_of(window, ((shard, writer), unique)))
            return
        current = number.read() or 0
        number.write(current + 1)
        yield _at_the_end_of(window, ((shard, writer, current), unique))

    def _counted(self, duplicates: int, window):
        if duplicates:
            self.duplicates.inc(duplicates)
            yield beam.pvalue.TaggedOutput(DUPLICATES, _at_the_end_of(window, report(DUPLICATES, duplicates)))


class GatherPanes(beam.PTransform):
    """A stream's encoded events in, repeats marked (``MarkRepeats``); ``unique`` panes numbered,
    ``((shard, writer, file number), [events])``, ``late`` panes ``((shard, writer), [events])`` and
    ``duplicates`` reports out, as ``Deduplicate`` gives a bounded input's.

    ``settings`` are the job's ``DeliverySettings``: its hours, shards, pane bound and trigger.
    """

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def expand(self, events):
        s = self.settings
        return (
            events
            | "KeyByPane"
            >> beam.Map(_keyed_by_pane, s.window_seconds, s.num_shards).with_output_types(
                tuple[tuple[int, int, str], typing.Any]
            )
            | "GatherAndNumber" >> beam.ParDo(GatherPanesFn(s)).with_outputs(DUPLICATES, LATE_PANES, main="unique")
        )

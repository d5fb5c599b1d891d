"""A stream's panes, gathered in state per (hour, shard, writer): repeats within a pane dropped, each
pane numbered.

One keyed step does what a grouping (``GroupByKey`` on a trigger) did, so an event's body crosses one
keyed shuffle on its way to its file: this one. Copies of an id in other panes (another writer's, a
later pane, another run's) are all staged, and the hour's close keeps the first of each
(``transforms.close_repeats``). Its state per key is what a grouping's buffer holds (the events waiting,
in a bag), whether the hour closed, and the number of the next staged file.

A pane goes out when the bytes waiting reach ``max_pane_bytes`` (Streaming Engine refuses
a value past ~80 MB and a commit past ~180 MB: a work item's commit is its input and at
most one pane more), ``trigger_seconds`` after its first event on the processing-time
clock (or, for a runner with no such clock, after ``trigger_events`` events), and when the
watermark closes the hour. The pane's number is committed with its output, so a retried
work item numbers its panes as the lost try did and the write replaces the same files.

Every pane is stamped at the end of its hour's window, as a grouping stamps its panes, and
the close's timer (an event-time timer, which holds the step's output at its time on
Dataflow) fires there: downstream, the hour's close comes after every pane staged for it.
A drain fires it too, so nothing waits in state when the windows expire. The flush timer,
on the processing-time clock, holds the output at its first element's stamp, which is the
end of the window too (``_keyed_by_pane``); the close clears it.

After the close, events go out one by one and are grouped downstream (see ``GatherPanesFn``).
"""

from __future__ import annotations

import time
import typing

import apache_beam as beam
from apache_beam.coders import BooleanCoder, FastPrimitivesCoder, TupleCoder, VarIntCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from event_delivery.contract import slo
from transforms import hours
from transforms.declared_types import ANY_OUTPUT
from transforms.dedup import keep_first_copies
from transforms.hours import BucketByHour, approximate_bytes, pane_key
from transforms.reports import DUPLICATES, report

LATE_EVENTS = "late_events"  # the output of events that came after their hour closed
NOTHING_WAITS = (0, 0, False)  # a key's pane cell before its first event
wall_clock = time.time  # module-level, so that a test can put it on its TestStream's clock


def _at_the_end_of(window, value) -> WindowedValue:
    """``value`` in ``window``, stamped at its end as a grouping stamps its panes. (A ``TimestampedValue``
    would be windowed anew by its stamp, into the next hour.)"""
    return WindowedValue(value, window.max_timestamp(), (window,))


def _stamped_with_arrival(event) -> TimestampedValue:
    """An event stamped with its ``received_at``, which decides its hour."""
    return TimestampedValue(event, event[1] / 1000)


def _keyed_by_pane(event, window_seconds: int, num_shards: int, window=beam.DoFn.WindowParam) -> WindowedValue:
    """``((bucket, shard, writer), event)``, the writer the worker process this runs in, stamped at the end
    of the event's window: the clock's timer that a pane's first event sets holds the output of
    ``GatherPanes`` at its element's time, so there, as the close's timer does, and not at an arrival
    far behind the watermark (a straggler's), which would hold every close of the type."""
    return _at_the_end_of(window, (pane_key(event, window_seconds, num_shards, hours.writer_id()), event))


@ANY_OUTPUT
class GatherPanesFn(beam.DoFn):
    """``((bucket, shard, writer), event)`` in; numbered panes ``((shard, writer, number), [events])`` out
    while the hour is open, ``late`` events one by one after its close, and ``duplicates`` reports of
    the second copies of an id within a pane, one with each pane.

    Late events are grouped by a ``GroupByKey`` downstream, not here: a grouping holds no watermark
    for late data, while a timer here would hold this step's output at their old time, and every
    close of the type behind it, for as long as late events keep coming.
    """

    EVENTS = BagStateSpec("events", FastPrimitivesCoder())
    # (events waiting, their bytes, whether the hour closed): read and written once an event
    PANE = ReadModifyWriteStateSpec("pane", TupleCoder((VarIntCoder(), VarIntCoder(), BooleanCoder())))
    NUMBER = ReadModifyWriteStateSpec("next_file_number", VarIntCoder())
    FLUSH = TimerSpec("flush", TimeDomain.REAL_TIME)
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)

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
        pane=beam.DoFn.StateParam(PANE),
        number=beam.DoFn.StateParam(NUMBER),
        flush=beam.DoFn.TimerParam(FLUSH),
        close=beam.DoFn.TimerParam(CLOSE),
    ):
        (_, shard, writer), event = keyed_event
        waiting, size, closed = pane.read() or NOTHING_WAITS
        if closed:
            yield beam.pvalue.TaggedOutput(LATE_EVENTS, event)
            return
        if not waiting:  # the pane's first event
            close.set(window.max_timestamp())
            if self.trigger:
                flush.set(Timestamp(wall_clock()) + self.trigger)
        events.add(event)
        waiting, size = waiting + 1, size + approximate_bytes(event)
        if size >= self.max_pane_bytes or (self.trigger_events and waiting >= self.trigger_events):
            yield from self._pane(shard, writer, window, events, pane, number, waiting)
        else:
            pane.write((waiting, size, False))

    @on_timer(FLUSH)
    def on_the_clock(
        self,
        key=beam.DoFn.KeyParam,
        window=beam.DoFn.WindowParam,
        events=beam.DoFn.StateParam(EVENTS),
        pane=beam.DoFn.StateParam(PANE),
        number=beam.DoFn.StateParam(NUMBER),
    ):
        yield from self._what_waits(key, window, events, pane, number)

    @on_timer(CLOSE)
    def on_the_close(
        self,
        key=beam.DoFn.KeyParam,
        window=beam.DoFn.WindowParam,
        events=beam.DoFn.StateParam(EVENTS),
        pane=beam.DoFn.StateParam(PANE),
        number=beam.DoFn.StateParam(NUMBER),
        flush=beam.DoFn.TimerParam(FLUSH),
    ):
        yield from self._what_waits(key, window, events, pane, number, closing=True)
        flush.clear()  # nothing waits for it, and it would hold a drain until it fires

    def _what_waits(self, key, window, events, pane, number, closing=False):
        """On a timer: what waits, as ``_pane``; nothing once the hour has closed."""
        _, shard, writer = key
        waiting, _, closed = pane.read() or NOTHING_WAITS
        if not closed:
            yield from self._pane(shard, writer, window, events, pane, number, waiting, closing)

    def _pane(self, shard, writer, window, events, pane, number, waiting: int, closing=False):
        """What waits, as one pane under the key's next number, its second copies of an id counted; stamped
        at the end of the hour's window, which the close's timer holds the output at: on time downstream,
        before the hour's close."""
        waited = []
        if waiting:  # the bag is read only when something waits in it
            waited = list(events.read())
            events.clear()
        pane.write((0, 0, closing))
        unique = keep_first_copies(waited, set())
        yield from self._counted(len(waited) - len(unique), window)
        if unique:
            current = number.read() or 0
            number.write(current + 1)
            yield _at_the_end_of(window, ((shard, writer, current), unique))

    def _counted(self, duplicates: int, window):
        if duplicates:
            self.duplicates.inc(duplicates)
            yield beam.pvalue.TaggedOutput(DUPLICATES, _at_the_end_of(window, report(DUPLICATES, duplicates)))


class Gathered(typing.NamedTuple):
    unique: beam.PCollection
    late: beam.PCollection
    duplicates: beam.PCollection


class GatherPanes(beam.PTransform):
    """A stream's encoded events in; ``Gathered`` out: ``unique`` panes
    numbered, ``((shard, writer, file number), [events])``; ``late`` panes ``((shard, writer), [events])``,
    the late events grouped as dead letters are (``BucketByHour``); and ``duplicates`` reports. So a
    stream gives what ``Deduplicate`` gives a bounded input.

    ``settings`` are the job's ``DeliverySettings``: its hours, shards, pane bound and trigger.
    """

    def __init__(self, settings):
        super().__init__()
        self.settings = settings

    def expand(self, events):
        s = self.settings
        gathered = (
            events
            | "StampWithArrival" >> beam.Map(_stamped_with_arrival)
            | "IntoHours" >> hours.hour_windows(s)
            | "KeyByPane"
            >> beam.Map(_keyed_by_pane, s.window_seconds, s.num_shards).with_output_types(
                tuple[tuple[int, int, str], typing.Any]
            )
            | "GatherAndNumber" >> beam.ParDo(GatherPanesFn(s)).with_outputs(DUPLICATES, LATE_EVENTS, main="unique")
        )
        late = gathered[LATE_EVENTS] | "BucketLateEvents" >> BucketByHour(s)
        return Gathered(gathered.unique, late, gathered[DUPLICATES])

"""Deduplicate by event id within (type, hour), across all panes of the hour."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.coders import BooleanCoder, StrUtf8Coder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, TimerSpec, on_timer

from transforms.reports import DUPLICATES, report

LATE = "late"


class DeduplicateFn(beam.DoFn):
    """Keeps the first copy of each id in an hour's shard and counts the others.

    State is the ids seen in earlier panes of this (hour, shard). It is dropped the
    moment the watermark closes the hour, so a job holds ids only for open hours.
    A pane that arrives after that can no longer be checked against the hour, so
    it goes out as ``late``, whatever timing label the runner gave it.
    """

    SEEN = BagStateSpec("seen", StrUtf8Coder())
    CLOSED = ReadModifyWriteStateSpec("closed", BooleanCoder())
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)

    def setup(self):
        self.duplicates = beam.metrics.Metrics.counter("delivery", "duplicates")

    def process(
        self,
        pane_elements,
        window=beam.DoFn.WindowParam,
        seen=beam.DoFn.StateParam(SEEN),
        closed=beam.DoFn.StateParam(CLOSED),
        close=beam.DoFn.TimerParam(CLOSE),
    ):
        shard, events = pane_elements
        if closed.read():
            yield beam.pvalue.TaggedOutput(LATE, (shard, events))
            return
        close.set(window.end)
        earlier = set(seen.read())
        unique = []
        for event in events:
            event_id = event[0]
            if event_id not in earlier:
                earlier.add(event_id)
                seen.add(event_id)
                unique.append(event)
        yield shard, unique
        duplicates = len(events) - len(unique)
        if duplicates:
            self.duplicates.inc(duplicates)
            yield beam.pvalue.TaggedOutput(DUPLICATES, report(DUPLICATES, duplicates))

    @on_timer(CLOSE)
    def close_hour(self, seen=beam.DoFn.StateParam(SEEN), closed=beam.DoFn.StateParam(CLOSED)):
        seen.clear()
        closed.write(True)


class Deduplicate(beam.PTransform):
    """``(shard, [events])`` panes in; ``unique`` and ``late`` panes and ``duplicates`` reports out."""

    def expand(self, panes):
        return panes | "DropRepeatedIds" >> beam.ParDo(DeduplicateFn()).with_outputs(DUPLICATES, LATE, main="unique")

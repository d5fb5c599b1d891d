"""``AfterAny`` on the local runner as Dataflow runs it (imported for that effect alone).

A stream's panes fire on ``AfterAny(AfterProcessingTime, AfterCount)`` (see
``transforms.hours.pane_trigger``). Dataflow runs triggers in its Java worker, which resets
every subtrigger of an ``AfterAny`` once it fires. The Python runner's ``AfterAny.on_fire``
(Beam 2.77, ``transforms/trigger.py``; apache/beam#21262) asks its subtriggers only whether
they are ready on the watermark, which an ``AfterProcessingTime`` never is, so after its
first firing it is never reset and never sets its timer again: an hour's panes then wait for
the count or the hour's end, and a late pane for its window's end plus the late horizon,
holding the watermark and every close behind it (the local runner reports a stall).

Here a subtrigger counts as ready when it is on either clock. The one difference left: a
processing-time timer set before a count fired still fires, as a small extra pane.
"""

from __future__ import annotations

from apache_beam.transforms import trigger
from apache_beam.transforms.timeutil import TimeDomain

_CLOCKS = (TimeDomain.WATERMARK, TimeDomain.REAL_TIME)


def _on_fire(self, watermark, window, context):
    finished = []
    for index, subtrigger in enumerate(self.triggers):
        nested = self._sub_context(context, index)
        if any(subtrigger.should_fire(clock, watermark, window, nested) for clock in _CLOCKS):
            finished.append(subtrigger.on_fire(watermark, window, nested))
    return self.combine_op(finished)


trigger._ParallelTriggerFn.on_fire = _on_fire

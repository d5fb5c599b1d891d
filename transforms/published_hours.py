"""Whether an hour is published: what ``MarkRepeats`` asks before it forgets the ids of an hour."""

from __future__ import annotations

import logging
import math
import time

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials

_LOG = logging.getLogger(__name__)
wall_clock = time.time  # module-level, so that a test can set the clock that tells a drain


class HourPublished:
    """Whether ``MarkRepeats`` may forget the ids of an hour: once no copy of them can reach an
    open hour any more. That is when the close has published the hour (its marker exists): a copy
    that comes later is checked against the hour's index, on the late path, or by the close if a
    step that lags staged it first (``transforms.late.move_late_checked``).

    Each step of a Dataflow job has a watermark of its own, and a step downstream may lag this
    one by any amount (a stalled write, a close that retries), so a cell dropped a window after
    the close by this step's watermark may be dropped before the close: a copy arriving then
    would be staged again, and published twice. The marker is asked at most once a second per
    hour and DoFn instance, and remembered once there; a question that fails keeps the cell a
    window more.

    Without a marker, a cell is still forgotten once its timer's time is past the late horizon
    of the hour (parsing refuses any copy published after it, and the watermark is a bound on
    publish times), or more than a window past the present: a drain, which moves the watermark
    to infinity (no copy comes to this run after it; the window is slack for the clocks).
    """

    ASK_EVERY_SECONDS = 1.0

    def __init__(self, settings):
        self.layout = settings.layout
        self.late_horizon_seconds = settings.late_horizon_seconds
        self.known = set()  # hour starts whose marker this worker has seen
        self.asked = {}  # hour start -> when its marker was last missing
        use_emulator_credentials()

    def may_forget(self, hour_start: int, fired_at_seconds: float) -> bool:
        hour_end, now = hour_start + self.layout.window_seconds, wall_clock()
        if (
            fired_at_seconds > hour_end + self.late_horizon_seconds
            or fired_at_seconds > now + self.layout.window_seconds
        ):
            return True
        return self._published(hour_start, now)

    def _published(self, hour_start: int, now: float) -> bool:
        if hour_start in self.known:
            return True
        if now - self.asked.get(hour_start, -math.inf) < self.ASK_EVERY_SECONDS:
            return False
        marker = self.layout.marker(hour_start)
        try:
            published = files.exists(marker)
        except Exception as error:  # noqa: BLE001 - a cell kept a window more is safe; a timer failing for good is not
            _LOG.warning("could not ask whether %s is published (%s)", marker, type(error).__name__)
            published = False
        if len(self.known) + len(self.asked) > 10_000:  # hours long published, or given up as past the horizon
            self.known.clear()
            self.asked.clear()
        if published:
            self.known.add(hour_start)
            self.asked.pop(hour_start, None)
        else:
            self.asked[hour_start] = now
        return published

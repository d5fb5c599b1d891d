"""Event-time timers hold their step's output on the local runner, as on Dataflow (imported for that effect alone).

On Dataflow an event-time timer holds its step's output watermark at its time until it
fires (the Python SDK sends the hold with the timer), so what the timer emits at that time
is on time downstream. The Python DirectRunner keeps no hold for a user's timer (Beam 2.77,
``runners/direct/direct_userstate.py``: "add corresponding watermark holds after the
DirectRunner allows for keyed watermark holds"): the output watermark runs ahead, and what
the timer emits reaches the steps after it behind their watermark, as if it came late.

``GatherPanes`` emits an hour's last pane from its close timer, and the hour's close
downstream must come after it. Here a stateful step that asks for it (``HOLDS_AT_TIMERS``)
reports, after each bundle, the earliest event-time timer still set for each key the bundle
touched, as the hold the local runner's watermark then respects.
"""

from __future__ import annotations

from apache_beam.runners.direct import transform_evaluator
from apache_beam.transforms.timeutil import TimeDomain

_finish_bundle = transform_evaluator._ParDoEvaluator.finish_bundle


def _earliest_event_timer(keyed_state):
    """The time of the key's earliest event-time timer still set, or None."""
    return min(
        (
            at
            for timers in keyed_state.timers.values()
            for (_, domain, _), at in timers.items()
            if domain == TimeDomain.WATERMARK
        ),
        default=None,
    )


def _finish_bundle_holding_at_timers(self):
    result = _finish_bundle(self)
    if getattr(self._applied_ptransform.transform.dofn, "HOLDS_AT_TIMERS", False):
        for key, keyed_state in self._step_context.partial_keyed_state.items():  # the keys this bundle touched
            result.keyed_watermark_holds[key] = _earliest_event_timer(keyed_state)
    return result


transform_evaluator._ParDoEvaluator.finish_bundle = _finish_bundle_holding_at_timers

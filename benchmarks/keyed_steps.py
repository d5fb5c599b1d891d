"""The streaming path's keyed step alone: what Beam's machinery costs an event there.

``GatherPanes`` (a bag and a cell per (hour, shard, writer), a pane per ``--max_pane_bytes`` or
trigger) as the streaming path runs it, one branch per type, fed with the workload's events
already encoded, as ``EncryptPersonalFields`` hands them on: the same ids, repeats, arrivals and
record sizes. Nothing is parsed, sealed or written, so the run is the framework's work on that
step, and the source's: the part of the streaming path's cost per event that no step's own code
can cut.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics, MetricsFilter

from benchmarks import workload
from event_delivery.contract import slo
from event_delivery.contract.envelope import parse_received_at
from transforms import collector
from transforms.records import encoded_event
from transforms.stream_panes import GatherPanes

NAMESPACE, KEPT = "keyed_steps", "kept"
_EVENTS: dict[str, list[tuple]] = {}  # by type; read by the source in this process (the in-memory runner)
# Made once: a counter made per element would add its making to the step's measured cost.
_KEPT = Metrics.counter(NAMESPACE, KEPT)


def load_events(work: workload.Workload) -> dict[str, list[tuple]]:
    """Each type's events as ``EncryptPersonalFields`` hands them on, loaded before the clock starts
    and returned: the archive's ids and arrivals in order, each record the size of its payload (the
    bytes a shuffle carries)."""
    for name in workload.MIX:
        _EVENTS[name] = [
            encoded_event(
                r["event_id"], parse_received_at(r["attributes"]["received_at"]), bytes(len(r["payload"])), False
            )
            for r in work.archived(name)
        ]
    return _EVENTS


def _events_of(_, name: str):
    collector.tune_for_streams()  # as ParseEvents tunes a worker's, first on the path
    return _EVENTS[name]


class KeyedSteps(beam.PTransform):
    """One type's encoded events through ``GatherPanes``; what it keeps and drops is counted, and ends there."""

    def __init__(self, name: str, settings):
        super().__init__()
        self.name, self.settings = name, settings

    def expand(self, pipeline):
        events = pipeline | "Start" >> beam.Impulse() | "EncodedEvents" >> beam.FlatMap(_events_of, self.name)
        gathered = events | "GatherPanes" >> GatherPanes(self.settings)
        return gathered.unique | "CountKept" >> beam.Map(_count_kept)


def _count_kept(pane) -> None:
    _, events = pane
    _KEPT.inc(len(events))


def counted(result) -> dict[str, int]:
    """``kept`` (the events in the panes) and ``duplicates`` (the second copies within a pane, which
    ``GatherPanes`` counts) of a finished run."""
    counters = result.metrics().query(MetricsFilter())["counters"]
    return {
        "kept": sum(c.committed for c in counters if c.key.metric.name == KEPT),
        "duplicates": sum(c.committed for c in counters if c.key.metric.name == slo.DUPLICATES),
    }

"""Deduplication across panes of an hour, bounded state, and late panes after the close.

Bounded state means: while an hour is open its state holds each distinct id once, and
once the hour closes nothing of its ids is left, whatever arrives afterwards.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import FixedWindows, IntervalWindow

from event_delivery.contract.registry import load_registry
from pipelines.runtime import LOCAL_BATCH_RUNNER
from tests.streams import LATENESS, TRIGGER, WINDOW, Clock, local_keys, local_settings, streaming_pipeline
from transforms.dedup import LATE, Deduplicate, DeduplicateFn
from transforms.hours import BucketByHour


def event(event_id, received_at_seconds):
    return (event_id, received_at_seconds * 1000, {"n": event_id})


def settings(tmp_path, **more):
    """Three shards, and a staging folder of its own that no earlier run wrote to."""
    return local_settings(tmp_path, load_registry()["service_log"], local_keys(tmp_path), num_shards=3, **more)


def run(clock, unique, late, duplicates, tmp_path):
    """Runs the stream through bucketing and deduplication and checks what comes out."""
    with streaming_pipeline() as pipeline:
        s = settings(tmp_path, late_horizon_seconds=3600)
        panes = pipeline | clock.finish() | BucketByHour(s)
        result = panes | Deduplicate(s)
        ids = lambda label, pcoll: pcoll | label >> beam.FlatMap(lambda pane: [e[0] for e in pane[1]])  # noqa: E731
        assert_that(ids("UniqueIds", result.unique), equal_to(unique), label="unique")
        assert_that(ids("LateIds", result.late), equal_to(late), label="late")
        counted = (
            result.duplicates
            | beam.Map(lambda report: report[1])
            | beam.WindowInto(FixedWindows(10**6))  # one window for the whole test
            | beam.CombineGlobally(sum).without_defaults()
        )
        assert_that(counted, equal_to(duplicates), label="duplicates")


def test_repeats_are_dropped_within_a_pane_and_across_panes(tmp_path):
    start = 600
    clock = Clock(start)
    clock.arrive(*(event(f"e{i}", start + i) for i in range(6)), event("e0", start))  # repeat in the same pane
    clock.advance(TRIGGER * 2)  # the first pane fires
    clock.arrive(event("e1", start + 1), event("e2", start + 2), event("e9", start + 9))  # repeats in a later pane
    clock.advance(TRIGGER * 2)
    run(clock, unique=["e0", "e1", "e2", "e3", "e4", "e5", "e9"], late=[], duplicates=[3], tmp_path=tmp_path)


def test_the_same_id_in_another_hour_is_not_a_duplicate(tmp_path):
    start = 600
    clock = Clock(start)
    clock.arrive(event("e1", start), event("e1", start + WINDOW))
    clock.advance(TRIGGER * 2)
    run(clock, unique=["e1", "e1"], late=[], duplicates=[], tmp_path=tmp_path)


def test_after_the_close_repeats_and_stragglers_are_late(tmp_path):
    start = 600
    clock = Clock(start)
    clock.arrive(event("e1", start + 1), event("e2", start + 2))
    clock.advance(WINDOW + LATENESS + TRIGGER)  # the hour closes
    clock.arrive(event("e1", start + 1), event("e3", start + 3))  # a repeat and a straggler, both late
    clock.advance(TRIGGER * 2)
    run(clock, unique=["e1", "e2"], late=["e1", "e3"], duplicates=[], tmp_path=tmp_path)


def test_a_bounded_input_keeps_each_id_once_per_hour_and_counts_the_rest(tmp_path):
    start, ids = 600, [f"e{i % 7}" for i in range(30)]  # 7 ids, most of them repeated
    events = [event(i, start + n) for n, i in enumerate(ids)] + [event("e1", start + WINDOW)]  # e1 again, next hour
    with beam.Pipeline(runner=LOCAL_BATCH_RUNNER) as pipeline:
        s = settings(tmp_path, late_horizon_seconds=3600, trigger_seconds=None)
        panes = pipeline | beam.Create(events) | BucketByHour(s)
        result = panes | Deduplicate(s)
        unique = result.unique | "UniqueIds" >> beam.FlatMap(lambda pane: [e[0] for e in pane[1]])
        assert_that(unique, equal_to(sorted(set(ids)) + ["e1"]), label="unique")
        per_hour = result.duplicates | beam.Map(lambda report: report[1]) | beam.CombineGlobally(sum).without_defaults()
        assert_that(per_hour, equal_to([len(ids) - len(set(ids))]), label="duplicates")  # none in the second hour
        assert_that(result.late, equal_to([]), label="late")


class BagState:
    """An in-memory stand-in for Beam's bag state, so a test can see what a step keeps."""

    def __init__(self):
        self.values = []

    def add(self, value):
        self.values.append(value)

    def read(self):
        return list(self.values)

    def clear(self):
        self.values = []


class ValueState:
    """An in-memory stand-in for Beam's read-modify-write state; None when cleared."""

    def __init__(self):
        self.value = None

    def write(self, value):
        self.value = value

    def read(self):
        return self.value

    def clear(self):
        self.value = None


class WatermarkTimer:
    def set(self, timestamp):
        self.at = timestamp


class OneHourShard:
    """Drives ``DeduplicateFn`` for one (hour, shard) by hand, with state it can inspect."""

    def __init__(self, tmp_path):
        self.fn = DeduplicateFn(settings(tmp_path))
        self.fn.setup()
        self.window = IntervalWindow(600, 600 + WINDOW + LATENESS)
        self.seen, self.started, self.closed, self.timer = BagState(), ValueState(), ValueState(), WatermarkTimer()

    def pane(self, *event_ids) -> list:
        events = [event(i, 600) for i in event_ids]
        state = {"seen": self.seen, "started": self.started, "closed": self.closed}
        return list(self.fn.process((0, events), self.window, close=self.timer, **state))

    def close(self):
        self.fn.close_hour(seen=self.seen, started=self.started, closed=self.closed)

    def held(self) -> dict:
        """Everything the (hour, shard) keeps in state, bar the ``closed`` flag that routes late panes."""
        return {"seen": self.seen.read(), "started": self.started.read()}


def test_an_open_hour_holds_each_distinct_id_once_and_a_closed_hour_holds_none(tmp_path):
    shard = OneHourShard(tmp_path)
    shard.pane("e1", "e2", "e1")
    shard.pane("e2", "e3", "e3", "e1")
    assert sorted(shard.seen.read()) == ["e1", "e2", "e3"], "repeats add nothing to the state"
    assert shard.timer.at == shard.window.end, "the state is dropped when the watermark closes the hour"

    shard.close()
    assert shard.held() == {"seen": [], "started": None}

    outputs = shard.pane("e1", "e4")
    assert [(o.tag, [e[0] for e in o.value[1]]) for o in outputs] == [(LATE, ["e1", "e4"])]
    assert shard.held() == {"seen": [], "started": None}, "a late pane adds nothing to a closed hour's state"

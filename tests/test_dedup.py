"""Deduplication across panes of an hour, bounded state, and late panes after the close.

Bounded state means: while an hour is open its state holds each distinct id once, and
once the hour closes nothing of its ids is left, whatever arrives afterwards.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import FixedWindows, IntervalWindow, TimestampedValue

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.registry import load_registry
from pipelines.runtime import LOCAL_BATCH_RUNNER
from tests.conftest import valid_fields
from tests.streams import LATENESS, TRIGGER, WINDOW, Clock, local_keys, local_settings, streaming_pipeline
from transforms import dedup
from transforms.dedup import LATE, REPEAT, Deduplicate, DeduplicateFn, MarkRepeats, MarkRepeatsFn, keep_first_copies
from transforms.hours import BucketByHour


def event(event_id, received_at_seconds):
    return (event_id, received_at_seconds * 1000, {"n": event_id})


def settings(tmp_path, num_shards=3, **more):
    """Three shards unless told otherwise, and a staging folder of the test's own."""
    return local_settings(tmp_path, load_registry()["service_log"], local_keys(tmp_path), num_shards=num_shards, **more)


def run(clock, unique, late, duplicates, tmp_path):
    """Runs the stream through bucketing and deduplication and checks what comes out."""
    with streaming_pipeline() as pipeline:
        s = settings(tmp_path, late_horizon_seconds=3600)
        panes = pipeline | clock.finish() | MarkRepeats(s) | BucketByHour(s)
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


def test_after_the_close_a_repeat_is_a_duplicate_and_a_straggler_is_late(tmp_path):
    start = 600
    clock = Clock(start)
    clock.arrive(event("e1", start + 1), event("e2", start + 2))
    clock.advance(WINDOW + LATENESS + TRIGGER)  # the hour closes
    clock.arrive(event("e1", start + 1), event("e3", start + 3), event("e3", start + 3))  # a repeat, a straggler twice
    clock.advance(TRIGGER * 2)
    run(clock, unique=["e1", "e2"], late=["e3"], duplicates=[2], tmp_path=tmp_path)


def test_a_repeat_later_than_a_window_after_the_close_is_written_again(tmp_path):
    """The bound of the ids' memory: past it, a repeat is late rather than dropped."""
    start = 600
    clock = Clock(start)
    clock.arrive(event("e1", start + 1))
    clock.advance(WINDOW + LATENESS + WINDOW + TRIGGER)  # closed, and its ids forgotten
    clock.arrive(event("e1", start + 1))
    clock.advance(TRIGGER * 2)
    run(clock, unique=["e1"], late=["e1"], duplicates=[], tmp_path=tmp_path)


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
    """Drives ``DeduplicateFn`` for one (hour, shard) by hand, with state it can inspect.

    An earlier run of the job left one staged file with ``earlier`` ids for the shard.
    """

    def __init__(self, tmp_path, earlier=("old-1", "old-2")):
        self.settings = settings(tmp_path, run_id="run2")
        layout = self.settings.layout
        log = self.settings.event_type
        staged = [{"event_id": i, "received_at": 600_000, **valid_fields(log)} for i in earlier]
        folder = layout.hour(layout.staging, 600)
        files.write_avro(
            f"{folder}/{partitions.pane_file_name('service_log', 'run1', 0, 0, 'old')}",
            log.parsed_delivered_schema,
            staged,
        )  # by another writer of the shard: a stream's writers are its worker processes, new in every run
        self.fn = DeduplicateFn(self.settings)
        self.fn.setup()
        self.window = IntervalWindow(600, 600 + WINDOW + LATENESS)
        self.seen, self.started, self.closed, self.timer = BagState(), ValueState(), ValueState(), WatermarkTimer()

    def pane(self, *events) -> list:
        state = {"seen": self.seen, "started": self.started, "closed": self.closed}
        return list(self.fn.process(((0, "new"), list(events)), self.window, close=self.timer, **state))

    def close(self):
        self.fn.close_hour(seen=self.seen, started=self.started, closed=self.closed)

    def held(self) -> dict:
        """Everything the (hour, shard) keeps in state, bar the ``closed`` flag that routes late panes."""
        return {"seen": self.seen.read(), "started": self.started.read()}


def repeat(event_id):
    return (*event(event_id, 600), REPEAT)


def test_a_shard_holds_only_what_earlier_runs_staged_and_nothing_once_the_hour_closed(tmp_path):
    shard = OneHourShard(tmp_path)
    [unique, duplicates] = shard.pane(event("e1", 600), event("old-1", 600), repeat("e1"))
    assert [e[0] for e in unique[1]] == ["e1"], "marked repeats and what an earlier run staged are dropped"
    assert duplicates.value[1] == 2
    shard.pane(event("e2", 600), event("e3", 600))
    assert sorted(shard.seen.read()) == ["old-1", "old-2"], "this run's ids add nothing to the shard's state"
    assert shard.timer.at == shard.window.end, "the state is dropped when the watermark closes the hour"

    shard.close()
    assert shard.held() == {"seen": [], "started": None}

    outputs = shard.pane(event("e1", 600), repeat("e4"), event("e5", 600))
    late, duplicates = outputs
    assert (late.tag, late.value[1]) == (LATE, [event("e1", 600), event("e5", 600)]), "late, the marked repeat dropped"
    assert duplicates.value[1] == 1, "and counted as a duplicate"
    assert shard.held() == {"seen": [], "started": None}, "a late pane adds nothing to a closed hour's state"


def test_an_id_holds_one_cell_until_a_window_after_its_hour_closed_and_none_after(tmp_path):
    fn, seen, timer = MarkRepeatsFn(remember_seconds=WINDOW), ValueState(), WatermarkTimer()
    window = IntervalWindow(600, 600 + WINDOW + LATENESS)
    first = list(fn.process(("e1", event("e1", 600)), window, seen=seen, forget=timer))
    again = list(fn.process(("e1", event("e1", 601)), window, seen=seen, forget=timer))
    assert first == [event("e1", 600)] and again == [(*event("e1", 601), REPEAT)]
    assert seen.read() is True and timer.at == window.end + WINDOW
    fn.forget_id(seen=seen)
    assert seen.read() is None


def test_what_a_pane_reads_from_state_does_not_grow_with_the_hour(tmp_path, monkeypatch):
    """50 panes of new ids in one hour: the last pane reads no more state than the first.

    Each pane checks its events against what it read from its (hour, shard)'s state;
    counting that set per pane is the state-access counter. (The per-id cells of
    ``MarkRepeats`` are one read per event by construction.)
    """
    reads = []

    def counted(events, seen):
        reads.append(len(seen))
        return keep_first_copies(events, seen)

    monkeypatch.setattr(dedup, "keep_first_copies", counted)
    s = settings(tmp_path, late_horizon_seconds=3600, num_shards=1, run_id="run2")
    OneHourShard(tmp_path)  # an earlier run's staged file, so there is something to read
    # Processing time runs ahead while the watermark creeps within the hour: each batch is a pane.
    stream = TestStream().advance_processing_time(600).advance_watermark_to(600)
    for n in range(50):
        batch = [event(f"p{n}-{i}", 600 + i) for i in range(20)]
        stream = stream.add_elements([TimestampedValue(e, 600 + n % 10) for e in batch])
        stream = stream.advance_processing_time(TRIGGER * 2).advance_watermark_to(600 + n + 1)
    pipeline = streaming_pipeline()
    pipeline | stream.advance_watermark_to_infinity() | MarkRepeats(s) | BucketByHour(s) | Deduplicate(s)
    result = pipeline.run()
    result.wait_until_finish()
    assert len(reads) == 50, "the hour came in 50 panes"
    assert max(reads) <= reads[0] == 2, "each pane reads the earlier run's 2 ids, no more"

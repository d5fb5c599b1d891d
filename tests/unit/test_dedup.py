"""Deduplication within a pane: a stream's panes gathered in state (``GatherPanes``), a bounded input's
whole-hour panes, and what a restart reads. Across an hour's panes, the close drops repeats
(``tests/unit/test_close_repeats.py``, and the whole path in ``tests/integration/test_delivery_path.py``).
"""

from __future__ import annotations

import itertools

import apache_beam as beam
import hypothesis
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import trigger
from apache_beam.transforms.window import (
    GlobalWindows,
    IntervalWindow,
    TimestampCombiner,
    TimestampedValue,
)
from apache_beam.utils.timestamp import Timestamp
from hypothesis import strategies as st

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.registry import load_registry
from pipelines.runtime import LOCAL_BATCH_RUNNER
from tests.messages import valid_fields
from tests.streams import LATENESS, TRIGGER, WINDOW, local_keys, local_settings, streaming_pipeline
from transforms import dedup, hours, stream_panes
from transforms.dedup import Deduplicate
from transforms.hours import BucketByHour, shard_of
from transforms.records import encoded_event
from transforms.stream_panes import LATE_EVENTS, GatherPanes, GatherPanesFn


def event(event_id, received_at_seconds):
    return encoded_event(event_id, received_at_seconds * 1000, event_id.encode(), forgotten=False)


def settings(tmp_path, num_shards=3, **more):
    """Three shards unless told otherwise, and a staging folder of the test's own."""
    return local_settings(tmp_path, load_registry()["service_log"], local_keys(tmp_path), num_shards=num_shards, **more)


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
    at = None

    def set(self, timestamp):
        self.at = timestamp

    def clear(self):
        self.at = None


class BagState:
    def __init__(self):
        self.values = []

    def add(self, value):
        self.values.append(value)

    def read(self):
        return list(self.values)

    def clear(self):
        self.values = []


class Counted:
    """An in-memory stand-in for a Beam counter."""

    total = 0

    def inc(self, n=1):
        self.total += n


class Gathering:
    """One key of ``GatherPanesFn`` with in-memory state: what it emits, event by event and on its timers."""

    def __init__(self, settings):
        self.fn = GatherPanesFn(settings)
        self.fn.setup()
        self.fn.duplicates = self.duplicates = Counted()  # the metric the dashboards chart
        self.window = IntervalWindow(600, 600 + WINDOW + LATENESS)
        self.state = dict(events=BagState(), pane=ValueState(), number=ValueState())
        self.flush, self.close = WatermarkTimer(), WatermarkTimer()

    def add(self, *events) -> list:
        timers = dict(flush=self.flush, close=self.close)
        return [out for e in events for out in self.fn.process(((600, 0, "w"), e), self.window, **self.state, **timers)]

    def on_the_clock(self) -> list:
        return list(self.fn.on_the_clock(key=(600, 0, "w"), window=self.window, **self.state))

    def on_the_close(self) -> list:
        return list(self.fn.on_the_close(key=(600, 0, "w"), window=self.window, **self.state, flush=self.flush))


def test_a_streams_pane_drops_repeats_takes_the_next_number_and_after_the_close_its_events_go_one_by_one(tmp_path):
    gathering = Gathering(settings(tmp_path))
    assert gathering.add(event("e1", 600), event("e1", 600), event("e1", 600)) == []
    assert gathering.close.at == gathering.window.max_timestamp(), "the close is set, and holds the output"
    assert gathering.flush.at == Timestamp(TRIGGER), "the pane waits trigger_seconds by the clock"
    [duplicates, pane] = gathering.on_the_clock()
    assert duplicates.tag == dedup.DUPLICATES and duplicates.value.value[1] == 2, "second copies: one report a pane"
    assert pane.value == ((0, "w", 0), [event("e1", 600)]), "a pane, under the key's first number"
    assert pane.timestamp == gathering.window.max_timestamp() and pane.windows == (gathering.window,), "its hour's"
    assert gathering.on_the_clock() == [], "nothing waits: no pane, and no number taken"
    gathering.close.at = None
    gathering.add(event("e1", 600))  # a copy in a later pane: staged, for the close to drop
    assert gathering.close.at == gathering.window.max_timestamp(), "a later pane waits for the close too"
    gathering.add(event("e2", 600), event("e2", 600))
    [duplicates, pane] = gathering.on_the_close()
    assert pane.value == ((0, "w", 1), [event("e1", 600), event("e2", 600)]), "what waits, under the next number"
    assert duplicates.value.value[1] == 1, "the second copy within the pane"
    assert gathering.flush.at is None, "the close clears the clock's timer: it would hold a drain"
    gathering.close.at = None
    late = gathering.add(event("e3", 600), event("e1", 600))
    assert [(out.tag, out.value[0]) for out in late] == [(LATE_EVENTS, "e3"), (LATE_EVENTS, "e1")], "one by one"
    assert (gathering.flush.at, gathering.close.at) == (None, None), "no timer for late events: it would hold the close"
    assert gathering.state["events"].read() == [] and gathering.state["number"].read() == 2, "nor state"
    assert gathering.on_the_close() == [], "a close that fires again sends nothing"
    assert gathering.duplicates.total == 2 + 1, "the duplicates metric counts what the reports count"
    specs = {spec.name for spec in GatherPanesFn.__dict__.values() if hasattr(spec, "coder")}
    assert specs == {"events", "pane", "next_file_number"}


def test_a_pane_waits_from_its_first_event_and_without_a_clock_goes_out_at_its_count(tmp_path, monkeypatch):
    gathering = Gathering(settings(tmp_path))
    gathering.add(event("e1", 600))
    monkeypatch.setattr(stream_panes, "wall_clock", lambda: 30)
    gathering.add(event("e2", 600), event("e1", 600))
    assert gathering.flush.at == Timestamp(TRIGGER), "later events do not put the pane off: it waits from its first"
    counted = Gathering(settings(tmp_path, trigger_events=3))
    assert counted.add(event("e1", 600), event("e2", 600)) == []
    assert counted.flush.at is None, "no clock: the count stands for it"
    [pane] = counted.add(event("e3", 600))
    assert pane.value == ((0, "w", 0), [event("e1", 600), event("e2", 600), event("e3", 600)]), "the third event"
    [duplicates, pane] = counted.add(event("e4", 600), event("e4", 600), event("e5", 600))
    assert pane.value == ((0, "w", 1), [event("e4", 600), event("e5", 600)]), "a second copy counts, and is dropped"
    assert duplicates.value.value[1] == 1


def test_an_event_reaches_its_pane_stamped_at_the_end_of_its_window_where_the_clocks_timer_holds_the_output():
    """On Dataflow a processing-time timer holds its step's output at the time of the element that set
    it: a straggler's arrival, far behind the watermark, would hold every close of the type."""
    window = IntervalWindow(600, 600 + WINDOW + LATENESS)
    keyed = stream_panes._keyed_by_pane(event("e1", 601), WINDOW, 3, window=window)
    assert keyed.timestamp == window.max_timestamp() and keyed.windows == (window,)
    assert keyed.value == ((600, shard_of("e1", 3), hours.writer_id()), event("e1", 601))


@hypothesis.given(
    sizes=st.lists(st.integers(min_value=1, max_value=300), min_size=1, max_size=60),
    bound=st.integers(min_value=50, max_value=1000),
)
@hypothesis.example(sizes=[10] * 6, bound=57)  # 28 bytes an event: two panes of three, the second counted from 0
@hypothesis.settings(max_examples=40, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
def test_every_event_goes_out_once_and_a_pane_is_cut_when_it_reaches_the_bound_not_before(tmp_path, sizes, bound):
    gathering = Gathering(settings(tmp_path, max_pane_bytes=bound))
    events = [encoded_event(f"e{n}", 600_000, b"x" * size, False) for n, size in enumerate(sizes)]
    cut = [out.value for out in gathering.add(*events)]
    panes = cut + [out.value for out in gathering.on_the_close()]
    assert [e for _, pane in panes for e in pane] == events, "each event once, in order"
    for _, pane in panes:
        assert sum(hours.approximate_bytes(e) for e in pane[:-1]) < bound, "cut once the bound is reached"
    for _, pane in cut:
        assert sum(hours.approximate_bytes(e) for e in pane) >= bound, "and not before: each pane counts from 0"
    assert [number for (_, _, number), _ in panes] == list(range(len(panes)))


def lagging_behind(stream, release_after_seconds: int):
    """An empty PCollection whose watermark stays at the stream's first element until processing
    time has gone ``release_after_seconds`` on: flattened into a step's input, it holds that step
    back as a stalled stage holds a Dataflow step (a write that retries, a close denied)."""
    return (
        stream
        | "FirstElement" >> beam.Map(lambda e: ("hold", e))
        | "HeldInAPane"
        >> beam.WindowInto(
            GlobalWindows(),
            trigger=trigger.Repeatedly(trigger.AfterProcessingTime(release_after_seconds)),
            accumulation_mode=trigger.AccumulationMode.DISCARDING,
            timestamp_combiner=TimestampCombiner.OUTPUT_AT_EARLIEST,
        )
        | "Hold" >> beam.GroupByKey()
        | "NothingOut" >> beam.FlatMap(lambda _: [])
    )


def test_a_restarted_stream_reads_no_earlier_file_and_stages_its_own_copies_for_the_close(tmp_path, monkeypatch):
    """Earlier runs left N ids for an open hour in files of P writers over the shards. A restarted run
    reads none of those files: the ids it sees again are staged once each, as its new ones, and the
    close keeps the first copy of each id across all runs' files (``tests/unit/test_close_repeats.py``)."""
    earlier_ids, writers, shards = 240, 4, 3
    s = settings(tmp_path, num_shards=shards, run_id="run2", late_horizon_seconds=3600)
    log, layout = s.event_type, s.layout
    staged = [f"old-{n}" for n in range(earlier_ids)]
    folder = layout.hour(layout.staging, 600)
    for writer in range(writers):
        for shard in range(shards):
            ids = [i for i in staged[writer::writers] if shard_of(i, shards) == shard]
            name = partitions.pane_file_name("service_log", "run1", 0, shard, f"w{writer}")
            records = [{"event_id": i, "received_at": 600_000, **valid_fields(log)} for i in ids]
            files.write_avro(f"{folder}/{name}", log.parsed_delivered_schema, records)
    reads = []
    read_event_ids = files.read_event_ids
    monkeypatch.setattr(files, "read_event_ids", lambda path: reads.append(path) or read_event_ids(path))
    new_writers = itertools.cycle(["a", "b", "c", "d", "e"])  # this run's worker processes
    monkeypatch.setattr(hours, "writer_id", lambda: next(new_writers))

    stream = TestStream().advance_processing_time(600).advance_watermark_to(600)
    again = staged[::3]
    for n in range(20):  # 20 panes, each with new ids and ids an earlier run staged
        batch = [event(f"new-{n}-{i}", 600 + i) for i in range(5)] + [event(i, 601) for i in again[n::20]]
        stream = stream.add_elements([TimestampedValue(e, 600 + n) for e in batch])
        stream = stream.advance_processing_time(TRIGGER * 2).advance_watermark_to(600 + n + 1)
    with streaming_pipeline() as pipeline:
        result = pipeline | stream.advance_watermark_to_infinity() | GatherPanes(s)
        here = result.unique | "Here" >> beam.FlatMap(lambda pane: [e[0] for e in pane[1]])
        new = [f"new-{n}-{i}" for n in range(20) for i in range(5)]
        assert_that(here, equal_to(new + again))
    assert reads == [], "no earlier file read"


def test_a_whole_hour_pane_drops_what_other_runs_staged_for_its_shard(tmp_path):
    """A backfill of an hour that a stream left open: its whole-hour pane reads only its own shard's
    files of other runs (this run's own files, a retried bundle's, are no earlier copies) and drops
    their ids."""
    s = settings(tmp_path, run_id="run2")
    log, layout = s.event_type, s.layout

    def stage(hour_start, run_id, shard, ids):
        path = f"{layout.hour(layout.staging, hour_start)}/{partitions.pane_file_name(log.name, run_id, 0, shard)}"
        records = [{"event_id": i, "received_at": hour_start * 1000, **valid_fields(log)} for i in ids]
        files.write_avro(path, log.parsed_delivered_schema, records)
        return path

    stage(0, "run1", 0, ["a1", "a2"])
    stage(0, "run1", 1, ["b1"])  # another shard's
    stage(0, "run2", 0, ["own"])
    hour = IntervalWindow(0, WINDOW)
    assert sorted(dedup.staged_by_earlier_runs(s, hour, 0)) == ["a1", "a2"]

    fn = dedup.DeduplicateBoundedPaneFn(s)
    fn.setup()
    pane = [event("a1", 1), event("own", 2), event("new", 3), event("new", 4)]
    [(key, unique), duplicates] = fn.process(((0, ""), pane), window=hour)
    assert key == (0, "", 0) and unique == [event("own", 2), event("new", 3)]
    assert duplicates.value[1] == 2, "the earlier run's id and the repeat are counted"

"""Hour bucketing: windows that close at hour end plus lateness, and stable shards."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys

import apache_beam as beam
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to
from apache_beam.transforms.window import IntervalWindow, TimestampedValue, WindowFn
from apache_beam.utils.timestamp import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from event_delivery.contract.hours import HourWindows
from event_delivery.contract.partitions import partition
from event_delivery.contract.registry import load_registry
from tests.streams import LATENESS, START, TRIGGER, WINDOW, Clock, local_settings, streaming_pipeline
from transforms import stream_panes
from transforms.hours import (
    PACK_WEIGHT_BYTES,
    WEIGHT,
    BucketByHour,
    FormPanesFn,
    PackByShardFn,
    approximate_bytes,
    bucket_start_seconds,
    hour_windows,
    pane_trigger,
    shard_of,
    writer_id,
)


@given(
    micros=st.integers(min_value=0, max_value=4_102_444_800 * 10**6),
    window_seconds=st.sampled_from([1, 10, 60, 600, 3600]),
    lateness=st.integers(min_value=0, max_value=7200),
)
def test_each_timestamp_gets_the_window_of_its_bucket(micros, window_seconds, lateness):
    windows = HourWindows(window_seconds, lateness)
    [window] = windows.assign(WindowFn.AssignContext(Timestamp(micros=micros)))
    start = bucket_start_seconds(window)
    assert isinstance(start, int) and start % window_seconds == 0
    assert start * 10**6 <= micros < (start + window_seconds) * 10**6
    assert window.end.micros == (start + window_seconds + lateness) * 10**6


def test_hour_partitions_are_hive_style_and_utc():
    assert partition(1_800_000_000 - 1_800_000_000 % 3600) == "dt=2027-01-15/hr=08"
    assert partition(1_800_000_010, window_seconds=10) == "dt=2027-01-15/hr=08-00-10"


def test_shards_are_the_same_in_every_process():
    ids = [f"event-{i}" for i in range(50)]
    here = [shard_of(i, 16) for i in ids]
    script = "from transforms.hours import shard_of; print([shard_of(f'event-{i}', 16) for i in range(50)])"
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        there = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        assert there.stdout.strip() == str(here)
    assert len(set(here)) > 8, "ids spread over the shards"


def test_window_fns_compare_by_settings():
    assert HourWindows(3600, 600) == HourWindows(3600, 600)
    assert HourWindows(3600, 600) != HourWindows(3600, 601)


def test_messages_without_an_id_spread_over_the_shards_and_events_keep_theirs():
    """A flood of id-less dead letters must not land on one key; an id keeps its shard, which dedup needs."""
    fn = PackByShardFn(window_seconds=3600, num_shards=16)
    fn.start_bundle()
    start = 1_800_000_000_000 - 1_800_000_000_000 % 3_600_000
    for n in range(200):
        list(fn.process(("", start + n, {"n": n})))
    list(fn.process(("e-42", start + 7, {"n": "event"})))
    form = FormPanesFn()
    packs = {key: pane for wv in fn.finish_bundle() for key, pane in form.process((wv.value[0], [wv.value[1]]))}
    assert len(packs) > 8, "id-less messages spread over the shards"
    [(event_shard, writer)] = [key for key, elements in packs.items() if any(e[0] == "e-42" for e in elements)]
    assert event_shard == shard_of("e-42", 16)
    assert writer == "", "a bounded input's panes are not split by writer"
    hour = IntervalWindow(start // 1000, start // 1000 + 3600)
    keyed = [stream_panes._keyed_by_pane(("", start + n, {"n": 0}), 3600, 16, hour).value[0] for n in range(200)]
    assert len({shard for _, shard, _ in keyed}) > 8, "nor when they are keyed one by one"
    assert {writer for _, _, writer in keyed} == {writer_id()}
    assert {bucket for bucket, _, _ in keyed} == {start // 1000}, "and each under its hour"


def test_a_streams_packs_are_keyed_by_the_process_that_read_them():
    fn = PackByShardFn(window_seconds=3600, num_shards=4, per_writer=True)
    fn.start_bundle()
    list(fn.process(("e-1", 1_800_000_000_000, {})))
    [packed] = fn.finish_bundle()
    assert packed.value[0] == (1_800_000_000, shard_of("e-1", 4), writer_id()) and len(writer_id()) == 12


class RefusePastTheCommitLimitFn(beam.DoFn):
    """Streaming Engine refuses a commit or a value past its limit, and the key then holds the
    watermark for good; the local runner takes any size. This step refuses as Dataflow does."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes

    def process(self, pane):
        encoded = len(pickle.dumps(pane, protocol=pickle.HIGHEST_PROTOCOL))
        if encoded > self.limit_bytes:
            raise RuntimeError(f"commit of {encoded} bytes refused: the limit is {self.limit_bytes}")
        yield from (element[0] for element in pane[1])


def test_a_backlog_far_past_the_pane_bound_is_shuffled_in_panes_within_it(tmp_path):
    """3,000 events of ~150 bytes reach one (hour, shard, writer) at once, as a backlog does:
    about 100 times the bound. Every pane (and pack) that crosses a shuffle stays within it."""
    bound = 4096
    s = local_settings(tmp_path, load_registry()["service_log"], keys=None, num_shards=1, max_pane_bytes=bound)
    ids = [f"backlog-{n:05d}" for n in range(3000)]
    clock = Clock(START).arrive(*((i, (START + 1) * 1000, {"n": i, "pad": "x" * 120}) for i in ids))
    clock.advance(TRIGGER * 2)
    with streaming_pipeline() as pipeline:
        panes = pipeline | clock.finish() | BucketByHour(s)
        # Pickling adds some bytes per element to what the bound counts: twice the bound is the limit here.
        delivered = panes | beam.ParDo(RefusePastTheCommitLimitFn(limit_bytes=2 * bound))
        assert_that(delivered, equal_to(ids))
        other_writers = panes | beam.Filter(lambda pane: pane[0][1] != writer_id())
        assert_that(other_writers, equal_to([]), label="keyed by the process that read them")


def _a_backlog_in_reads(clock: Clock, reads: int, per_read: int, make) -> Clock:
    """``reads`` reads of ``per_read`` elements each, all before the pane's trigger time, as
    a backlog comes in when a job catches up: every read is a bundle of its own."""
    for read in range(reads):
        clock.arrive(*(make(read * per_read + n) for n in range(per_read)))
    return clock


def _bytes_per_firing(keyed, s):
    """The bytes of what each firing of the panes' grouping holds (weights left out), as it
    leaves in one commit; and its key and window."""
    grouped = keyed | hour_windows(s, pane_trigger(s)) | beam.GroupByKey()
    return grouped | beam.ParDo(_FiringFn())


class _FiringFn(beam.DoFn):
    def process(self, grouped, window=beam.DoFn.WindowParam):
        key, values = grouped
        real = [v for v in values if v != WEIGHT]
        if real:
            yield (
                key,
                bucket_start_seconds(window),
                sum(len(v) if isinstance(v, bytes) else approximate_bytes(v) for v in real),
            )


def test_packs_fire_once_their_bytes_wait_and_small_ones_do_not_fire_on_their_number(tmp_path):
    """Dead letters and the raw archive are packed per read: 40 reads of one 200 kB message,
    one pack per read, fire on the bytes, none past twice the bound and a read; 40 reads of a
    small message fire once, on the clock, as if unpacked they would not."""
    bound = 4 * PACK_WEIGHT_BYTES
    s = local_settings(tmp_path, load_registry()["service_log"], keys=None, num_shards=1, max_pane_bytes=bound)
    as_deployed = local_settings(tmp_path, load_registry()["service_log"], keys=None, num_shards=1)
    large = lambda n: (f"m-{n:05d}", (START + 1) * 1000, {"payload": "x" * 200_000})  # noqa: E731
    small = lambda n: (f"s-{n:05d}", (START + 1) * 1000, {"payload": "x"})  # noqa: E731
    pack = PackByShardFn(WINDOW, num_shards=1, per_writer=True, max_pack_bytes=bound)
    for name, make in (("large", large), ("small", small)):
        clock = _a_backlog_in_reads(Clock(START), reads=40, per_read=1, make=make)
        with streaming_pipeline() as pipeline:
            messages = pipeline | clock.advance(TRIGGER * 2).finish()
            fired = _bytes_per_firing(messages | beam.ParDo(pack), s if name == "large" else as_deployed)
            if name == "large":
                too_large = fired | beam.Filter(lambda firing: firing[2] > 2 * bound + 200_100)
                assert_that(too_large, equal_to([]), label="no firing past the bound and a read")
            else:
                assert_that(fired | beam.Map(lambda firing: firing[0][0]), equal_to([START]), label="one firing")
            ids = messages | BucketByHour(s) | beam.FlatMap(lambda pane: [m[0] for m in pane[1]])
            assert_that(ids, equal_to([make(n)[0] for n in range(40)]), label="every message in a pane once")


def test_a_key_holds_one_hours_window_so_a_backlog_of_hours_fires_apart(tmp_path):
    """Timers that fire together in one work item leave in one commit: a key holding a
    window per hour of a backlog would fire all of them at once. A key holds one hour."""
    s = local_settings(tmp_path, load_registry()["service_log"], keys=None, num_shards=1)
    hours = [START + h * WINDOW for h in range(3)]
    make = lambda n: (f"e-{n:04d}", (hours[n % 3] + 1) * 1000, {"n": n})  # noqa: E731
    clock = _a_backlog_in_reads(Clock(START), reads=10, per_read=30, make=make)
    with streaming_pipeline() as pipeline:
        events = pipeline | clock.advance(TRIGGER * 2).finish()
        events = events | beam.Map(lambda e: TimestampedValue(e, e[1] / 1000))
        packed = events | beam.ParDo(
            PackByShardFn(WINDOW, num_shards=1, per_writer=True, max_pack_bytes=s.max_pane_bytes)
        )
        fired = _bytes_per_firing(packed, s)
        elsewhere = fired | beam.Filter(lambda firing: firing[0][0] != firing[1])
        assert_that(elsewhere, equal_to([]), label="each key's firings are its own hour's")
        assert_that(fired | beam.Map(lambda f: f[1]), _covers(hours), label="every hour fired")


def _covers(expected):
    def match(actual):
        if set(actual) != set(expected):
            raise BeamAssertException(f"{sorted(set(actual))} != {sorted(expected)}")

    return match


def test_late_stragglers_fire_each_on_the_clock_and_a_late_backlog_on_the_bytes(tmp_path):
    """After the hour closed, three stragglers a trigger interval apart leave as three panes,
    then a backlog of 20 reads fires on the bytes. The local runner's own ``AfterAny`` fires
    the first straggler only and holds the rest, and every close, until the late horizon
    (``transforms/any_trigger.py``); Dataflow fires each."""
    bound = 50 * PACK_WEIGHT_BYTES  # fires at twice that: 100 elements of ("key", n), which stand for a pack each
    s = local_settings(tmp_path, load_registry()["service_log"], keys=None, num_shards=1, max_pane_bytes=bound)
    clock = Clock(START).advance(WINDOW + LATENESS + TRIGGER)
    in_the_closed_hour = START + 1

    def arrive_late(*elements):
        clock.stream = clock.stream.add_elements([TimestampedValue(e, in_the_closed_hour) for e in elements])

    for straggler in range(3):
        arrive_late(("key", straggler))
        clock.advance(TRIGGER * 2)
    for read in range(20):
        arrive_late(*(("key", 1000 + read * 50 + n) for n in range(50)))
    with streaming_pipeline() as pipeline:
        fired = pipeline | clock.advance(TRIGGER * 2).finish() | hour_windows(s, pane_trigger(s))
        fired = fired | beam.GroupByKey() | beam.MapTuple(lambda key, elements: sorted(elements))
        stragglers = fired | beam.Filter(lambda elements: elements and min(elements) < 1000)
        assert_that(stragglers, equal_to([[0], [1], [2]]), label="a pane each")
        too_large = fired | beam.Filter(lambda elements: len(elements) > 100 + 50 - 1)
        assert_that(too_large | beam.Map(len), equal_to([]), label="no firing past the bound")
        every = [*range(3), *range(1000, 2000)]
        assert_that(fired | beam.FlatMap(lambda elements: elements), equal_to(every), label="each fired once")


def test_a_bounded_inputs_hour_and_shard_is_one_pane_whatever_the_pane_bound(tmp_path):
    """Its deduplication needs every copy of an id in one pane: a batch shuffle takes any size."""
    s = local_settings(tmp_path, load_registry()["service_log"], None, num_shards=1, trigger_seconds=None)
    s = dataclasses.replace(s, max_pane_bytes=1000)
    events = [(f"e-{n:04d}", (START + 1) * 1000, {"pad": "x" * 100}) for n in range(100)]
    with beam.Pipeline() as pipeline:
        panes = pipeline | beam.Create(events) | BucketByHour(s)
        sizes = panes | beam.Map(lambda pane: (pane[0], len(pane[1])))
        assert_that(sizes, equal_to([((0, ""), 100)]))


def test_a_bundle_spanning_hours_packs_each_element_with_the_others_of_its_hour():
    """A pack is windowed by its stamp, so every element in it must belong to that stamp's hour:
    here a bundle of one shard holds events all over three hours, including the half past and
    the turn of the hour, whatever else a key built from the arrival time could confuse."""
    hour = 3_600_000
    start = 1_800_000_000_000 - 1_800_000_000_000 % hour
    arrivals = [start + h * hour + offset for h in range(3) for offset in (0, 100, hour // 2 + 100, hour - 1)]
    fn = PackByShardFn(window_seconds=3600, num_shards=1)
    fn.start_bundle()
    for n, received_at in enumerate(arrivals):
        assert not list(fn.process((f"e{n}", received_at, {"n": n})))
    packs = [(wv.timestamp.micros // 1000, pickle.loads(wv.value[1])) for wv in fn.finish_bundle()]
    assert sorted(stamp for stamp, _ in packs) == [start, start + hour, start + 2 * hour], "a pack per hour"
    for stamp, elements in packs:
        assert [e[1] for e in elements] == [t for t in arrivals if t - t % hour == stamp]


def test_a_stream_pane_holds_as_many_packs_as_fit_within_the_bound_and_no_more():
    """Cut at the bound, not before: a pane of fewer packs than fit means more, smaller files."""
    element = ("e-00001", 1_800_000_000_000, {"field": "x" * 10})  # 7 + 8 + 5 + 10 = 30 bytes
    assert approximate_bytes(element) == 30
    assert approximate_bytes({"k": [b"12", 3.5, None]}) == 1 + 2 + 8 + 8, "keys, bytes, 8 for the rest"
    pack = pickle.dumps([element], protocol=pickle.HIGHEST_PROTOCOL)
    panes = list(FormPanesFn(max_pane_bytes=4 * len(pack)).process(((0, 1, "w"), [pack] * 10)))
    assert [len(elements) for _, elements in panes] == [4, 4, 2] and {key for key, _ in panes} == {(1, "w")}
    assert [len(p) for _, p in FormPanesFn().process(((0, 1, "w"), [pack] * 10))] == [10]

"""Hour bucketing: windows that close at hour end plus lateness, and stable shards."""

from __future__ import annotations

import os
import subprocess
import sys

from apache_beam.transforms.window import WindowFn
from apache_beam.utils.timestamp import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from event_delivery.contract.hours import HourWindows
from event_delivery.contract.partitions import partition
from transforms.hours import PackByShardFn, _unpack, bucket_start_seconds, shard_of


@given(
    micros=st.integers(min_value=0, max_value=4_102_444_800 * 10**6),
    window_seconds=st.sampled_from([1, 10, 60, 600, 3600]),
    lateness=st.integers(min_value=0, max_value=7200),
)
def test_each_timestamp_gets_the_window_of_its_bucket(micros, window_seconds, lateness):
    windows = HourWindows(window_seconds, lateness)
    [window] = windows.assign(WindowFn.AssignContext(Timestamp(micros=micros)))
    start = bucket_start_seconds(window)
    assert start % window_seconds == 0
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
        fn.process(("", start + n, {"n": n}))
    fn.process(("e-42", start + 7, {"n": "event"}))
    packs = dict(_unpack((key, [pack])) for key, pack in (wv.value for wv in fn.finish_bundle()))
    assert len(packs) > 8, "id-less messages spread over the shards"
    [(event_shard, writer)] = [key for key, elements in packs.items() if any(e[0] == "e-42" for e in elements)]
    assert event_shard == shard_of("e-42", 16)
    assert writer == "", "a bounded input's panes are not split by writer"

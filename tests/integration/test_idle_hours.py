"""An idle type: hours pass with nothing published, and each still closes with a marker.

A consumer that waits on ``_SUCCESS`` must not wait forever for a quiet hour. The job
runs on the emulators with 2-second hours, so hours pass while the test waits.
"""

from __future__ import annotations

import datetime
import itertools
import time

import pytest

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.partitions import Layout
from tests.streams import local_keys
from tools.local.jobs import start_job, stop_jobs
from tools.ops import provision

pytestmark = [pytest.mark.emulators, pytest.mark.slow]

PROJECT = "local-project"
WINDOW, LATENESS = 2, 1
ENOUGH_HOURS = 4
# The local runner's Pub/Sub read moves its watermark after each pull, and an empty pull
# waits up to 30 s: markers come in bursts, the first within about that. Two busy cores can
# stretch each pull and each burst of closes; the test waits for the markers, up to this long.
DEADLINE_SECONDS = 300


def test_every_hour_from_the_start_gets_a_marker_that_counts_zero(emulators, registry, tmp_path):
    play = registry["play"]
    provision.provision(PROJECT, [play], None)
    root = str(tmp_path / "root")
    args = [
        f"--project={PROJECT}",
        f"--storage_root={root}",
        f"--window_seconds={WINDOW}",
        f"--allowed_lateness_seconds={LATENESS}",
        "--trigger_seconds=1",
        "--late_horizon_seconds=600",
        f"--keystore=sqlite:///{tmp_path}/keystore.db",
        f"--local_key_file={tmp_path}/kek.key",
    ]
    local_keys(tmp_path)  # provisioned: a job never creates keys
    launched = time.time()
    job = start_job(play.name, args, tmp_path / "logs")
    try:
        job.wait_ready()
        ready = time.time()  # the job was built, and its clock started, by now
        layout = Layout.under(root, play.name, WINDOW)
        deadline = time.time() + DEADLINE_SECONDS
        # Hours close side by side, so a later hour's marker may land before an earlier one's:
        # wait for enough of them, with none missing in between (or for the deadline), and judge
        # the listing that had them, not a later one caught in the middle of a burst of closes.
        markers = _markers(layout)
        while not _enough_without_gaps(markers) and time.time() < deadline:
            assert job.process.poll() is None, job.log_tail()
            time.sleep(1)
            markers = _markers(layout)
    finally:
        stop_jobs([job])

    hour_starts = _hour_starts(markers)
    assert _enough_without_gaps(markers), (
        f"no {ENOUGH_HOURS} markers of consecutive hours within {DEADLINE_SECONDS} s, only of the hours "
        f"starting at {hour_starts}:\n{job.log_tail()}"
    )
    assert launched - WINDOW < hour_starts[0] <= ready, f"no marker for the hour the job started in: {hour_starts}"
    gaps = [b - a for a, b in itertools.pairwise(hour_starts)]
    assert set(gaps) == {WINDOW}, f"hours without a marker between {hour_starts}"
    for partition, manifest in markers.items():
        assert manifest["files"] == [], partition
        assert set(manifest["accounting"].values()) == {0}, partition
        _, hour_end = partitions.partition_bounds(partition, WINDOW)
        assert datetime.datetime.fromisoformat(manifest["hour_end"]).timestamp() * 1000 == hour_end


def _markers(layout: Layout) -> dict[str, dict]:
    prefix = partitions.join(layout.delivered, layout.event_type) + "/"
    paths = files.glob(partitions.join(layout.delivered, layout.event_type, "dt=*", "hr=*", partitions.SUCCESS_MARKER))
    return {path[len(prefix) :].rsplit("/", 1)[0]: files.read_json(path) for path in paths}


def _hour_starts(markers: dict) -> list[int]:
    return sorted(partitions.partition_bounds(p, WINDOW)[0] // 1000 for p in markers)


def _enough_without_gaps(markers: dict) -> bool:
    starts = _hour_starts(markers)
    return len(starts) >= ENOUGH_HOURS and all(b - a == WINDOW for a, b in itertools.pairwise(starts))

"""Isolation: one type flooded with garbage and with a broken sink; another type next to it
keeps delivering and closes its hours on time."""

from __future__ import annotations

import datetime
import pathlib
import random
import threading
import time

import pytest

from event_delivery.cloud import files
from event_delivery.contract.partitions import Layout
from event_delivery.local.jobs import start_job, stop_jobs
from event_delivery.local.loadgen import TrafficMix, publish_traffic, traffic
from event_delivery.ops import provision
from event_delivery.ops.audit import audit_type
from event_delivery.ops.producer import EventPublisher

pytestmark = [pytest.mark.emulators, pytest.mark.slow]

WINDOW, LATENESS, TRIGGER = 10, 5, 2
# The DirectRunner's Pub/Sub read blocks up to 30 s on an empty pull, which delays closes.
ON_TIME_SLACK_SECONDS = 35


def job_args(root: pathlib.Path, state: pathlib.Path) -> list[str]:
    return [
        "--project=local-project",
        f"--storage_root={root}",
        f"--window_seconds={WINDOW}",
        f"--allowed_lateness_seconds={LATENESS}",
        f"--trigger_seconds={TRIGGER}",
        "--late_horizon_seconds=600",
        "--num_shards=2",
        f"--keystore=sqlite:///{state}/keystore.db",
        f"--local_key_file={state}/kek.key",
    ]


def test_a_broken_flooded_type_does_not_hold_back_another(emulators, registry, tmp_path):
    healthy, broken = registry["play"], registry["search"]
    provision.provision("local-project", [healthy, broken], None)
    healthy_root, broken_root = tmp_path / "play-root", tmp_path / "search-root"
    # The broken type's sink cannot write: a file stands where its folders must go.
    for blocked in ("delivered/_staging/search", "dead-letter/search", "late/search"):
        (broken_root / blocked).parent.mkdir(parents=True, exist_ok=True)
        (broken_root / blocked).write_text("not a folder")

    jobs = [
        start_job("play", job_args(healthy_root, tmp_path), tmp_path / "logs"),
        start_job("search", job_args(broken_root, tmp_path), tmp_path / "logs"),
    ]
    try:
        for job in jobs:
            job.wait_ready()
        flood = threading.Thread(
            target=publish_traffic,
            args=(
                EventPublisher("local-project", broken),
                traffic(broken, 3000, TrafficMix(duplicates=0, malformed=1.0, late=0), random.Random(1)),
                300,
            ),
        )
        flood.start()
        ledger = publish_traffic(
            EventPublisher("local-project", healthy),
            traffic(healthy, 200, TrafficMix(duplicates=0.1, malformed=0.05, late=0), random.Random(2)),
            rate=10,
        )
        flood.join()
        first_seen = _watch_markers(healthy_root, deadline=time.time() + WINDOW + LATENESS + ON_TIME_SLACK_SECONDS + 10)
    finally:
        stop_jobs(jobs)

    assert "Not a directory" in jobs[1].log_path.read_text(errors="replace"), "the broken type did break"
    audit = audit_type(Layout.under(healthy_root, "play", WINDOW))
    assert not audit.problems and audit.settled
    accounted = sum(audit.total(k) for k in ("delivered", "duplicates", "late", "dead_lettered"))
    assert accounted == ledger.published
    for partition, seen_at in first_seen.items():
        day, hour = partition.split("/")
        start = datetime.datetime.fromisoformat(f"{day[3:]}T{hour[3:].replace('-', ':')}+00:00").timestamp()
        assert seen_at - (start + WINDOW + LATENESS) < ON_TIME_SLACK_SECONDS, f"{partition} closed late"


def _watch_markers(root: pathlib.Path, deadline: float) -> dict[str, float]:
    """When each hour's marker first appeared, until every hour with files has one."""
    seen = {}
    while time.time() < deadline:
        for marker in files.glob(f"{root}/delivered/play/dt=*/hr=*/_SUCCESS"):
            seen.setdefault("/".join(marker.split("/")[-3:-1]), time.time())
        staged = files.glob(f"{root}/delivered/_staging/play/dt=*/hr=*/*.avro")
        if seen and not staged:
            return seen
        time.sleep(1)
    return seen

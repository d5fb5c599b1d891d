"""Restart: a job cancelled mid-hour and started again delivers each id once, and the raw
archive of both runs backfills the hour's full accounting."""

from __future__ import annotations

import time
import uuid

import pytest

from event_delivery.cloud import clients, files
from event_delivery.contract.partitions import Layout
from event_delivery.producer import EventPublisher
from pipelines import backfill
from tests.emulated import PROJECT
from tests.messages import valid_fields
from tests.streams import local_keys
from tools.local.jobs import start_job, stop_jobs
from tools.ops import provision
from tools.ops.audit import audit_type

pytestmark = [pytest.mark.emulators, pytest.mark.slow]

WINDOW, LATENESS, TRIGGER = 60, 30, 2
TYPE = "page_view"
# Each run's lateness keeps the hour open as long as that run needs, however busy the machine: the
# first run's until it has staged everything and is stopped, the second's until it has started and
# read its messages (this long after it is launched).
HOLD_OPEN_SECONDS = 3600
SECOND_RUN_READS_SECONDS = 90


def fresh_subscription(event_type) -> str:
    """A subscription of the type's topic that sees only what this test publishes."""
    provision.provision(PROJECT, [event_type], None)
    subscriber = clients.subscriber_client()
    path = subscriber.subscription_path(PROJECT, f"restart-{uuid.uuid4().hex[:8]}")
    subscriber.create_subscription(name=path, topic=clients.publisher_client().topic_path(PROJECT, event_type.topic))
    return path


def job_args(root: str, subscription: str, state, lateness: int = LATENESS) -> list[str]:
    local_keys(state)  # provisioned, as `make provision` does before any job
    return [
        f"--project={PROJECT}",
        f"--subscription={subscription}",
        f"--storage_root={root}",
        f"--raw_archive_root={root}/raw",
        f"--window_seconds={WINDOW}",
        f"--allowed_lateness_seconds={lateness}",
        f"--trigger_seconds={TRIGGER}",
        "--num_shards=2",
        f"--keystore=sqlite:///{state}/keystore.db",
        f"--local_key_file={state}/kek.key",
    ]


def wait_for(condition, timeout_seconds: float, what: str) -> None:
    deadline = time.time() + timeout_seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def records(root: str) -> int:
    return sum(files.count_avro_records(p) for p in files.glob(f"{root}/{TYPE}/dt=*/hr=*/*.avro"))


def test_a_restarted_job_delivers_each_id_once(emulators, registry, bucket, tmp_path):
    event_type = registry[TYPE]
    root = f"gs://{bucket}"
    subscription = fresh_subscription(event_type)
    publisher = EventPublisher(PROJECT, event_type)
    hour = None  # the bucket every message is stamped into, chosen once the first run is up

    def publish(ids, malformed=0):
        for i in ids:
            publisher.publish(valid_fields(event_type, i), f"r{i}", hour * 1000 + i)
        for _ in range(malformed):
            attributes = {"event_id": f"bad-{uuid.uuid4().hex[:6]}", "received_at": str(hour * 1000)}
            publisher.publish_raw(b"{not json", attributes)
        return publisher.flush()

    def audit(output):
        result = audit_type(Layout.under(output, TYPE, WINDOW))
        assert not result.problems
        return result

    first = start_job(TYPE, job_args(root, subscription, tmp_path, HOLD_OPEN_SECONDS), tmp_path / "first")
    try:
        first.wait_ready()
        now = time.time()
        hour = int(now - now % WINDOW)
        published = publish([*range(30), 0, 1, 2], malformed=2)
        # Stop only once every branch has written what the second run relies on: the staged
        # panes, the dead letters and the raw archive each come from their own grouping step.
        wait_for(
            lambda: (
                (audit(root).total("staged"), records(f"{root}/dead-letter"), records(f"{root}/raw"))
                == (30, 2, published)
            ),
            240,
            "the first run to stage its panes, dead letters and raw archive",
        )
    finally:
        stop_jobs([first])
    # Redeliveries of ids the first run staged, new ids, and one more dead letter.
    published += publish([*range(10, 20), *range(30, 40)], malformed=1)

    close = max(hour + WINDOW + LATENESS, int(time.time()) + SECOND_RUN_READS_SECONDS)
    second = start_job(TYPE, job_args(root, subscription, tmp_path, close - hour - WINDOW), tmp_path / "second")
    try:
        second.wait_ready()
        assert time.time() < close, f"the second run started reading {time.time() - close:.0f} s after its hour closed"
        wait_for(lambda: audit(root).settled and audit(root).closed_hours, close - time.time() + 240, "the close")
    finally:
        stop_jobs([second])

    result = audit(root)
    [closed] = [h for h in result.hours.values() if h.closed and h.total]  # every other hour closed empty
    assert sorted(closed.delivered_ids) == sorted(f"r{i}" for i in range(40)), "each id once, across both runs"
    manifest = files.read_json(f"{root}/delivered/{TYPE}/{closed.partition}/_SUCCESS")
    assert manifest["accounting"]["delivered"] == 40
    assert manifest["accounting"]["dead_lettered"] == 3, "the first run's dead letters are counted by the close"
    assert manifest["accounting"]["duplicates"] == 10, "the second run knows what the first delivered"
    assert result.total("late") == 0
    # The three repeats the first run dropped were counted in its state, which the cancel lost.
    assert published == 40 + 10 + 3 + 3

    hour_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(hour))
    end_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(hour + WINDOW))
    flags = job_args(root, subscription, tmp_path)
    keys = [f for f in flags if f.startswith(("--keystore", "--local_key_file"))]
    layout = [f for f in flags if f.startswith(("--window", "--allowed", "--num_shards"))]
    backfill_args = [f"--event_type={TYPE}", f"--raw_archive_root={root}/raw", f"--storage_root={root}/backfill"]
    assert backfill.main([*backfill_args, f"--start={hour_text}", f"--end={end_text}", *keys, *layout]) == 0
    again = audit(f"{root}/backfill")
    [backfilled] = again.hours.values()
    assert sorted(backfilled.delivered_ids) == sorted(closed.delivered_ids)
    assert (backfilled.duplicates, backfilled.dead_lettered) == (13, 3), "the archive holds every message"
    assert backfilled.total == published

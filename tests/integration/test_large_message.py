"""A message as large as Pub/Sub accepts is dead-lettered, and the type keeps delivering.

On the emulator the client library's channel keeps gRPC's 4 MB receive limit, so
without care one such message fails every pull of the local runner, the job dies,
and the message, never acknowledged, stops the type for good.
"""

from __future__ import annotations

import collections
import json
import time

import pytest

from event_delivery.contract.partitions import Layout
from event_delivery.producer import EventPublisher, attributes_for
from tests.by_id import assert_every_id_in_one_place
from tests.emulated import PROJECT, short_hours_job_args
from tests.messages import valid_fields
from tools.local.jobs import start_job, stop_jobs
from tools.ops import provision
from tools.ops.audit import audit_type

pytestmark = [pytest.mark.emulators, pytest.mark.slow]

WINDOW, LATENESS, TRIGGER = 10, 5, 2
# Just under Pub/Sub's 10 MB request limit, which the emulator enforces too.
LARGE_BYTES = 9_900_000
CLOSE_TIMEOUT_SECONDS = WINDOW + LATENESS + 90


def test_a_nearly_10_mb_message_is_dead_lettered_and_the_hours_around_it_close(emulators, registry, tmp_path):
    play = registry["play"]
    provision.provision(PROJECT, [play], None)
    root = tmp_path / "root"
    job = start_job(
        "play",
        short_hours_job_args(root, tmp_path, WINDOW, LATENESS, TRIGGER),
        tmp_path / "logs",
    )
    try:
        job.wait_ready()
        publisher = EventPublisher(PROJECT, play)
        before = [publisher.publish(valid_fields(play, seed)) for seed in range(5)]
        large = json.dumps({"track_id": "x" * LARGE_BYTES})[:LARGE_BYTES].encode()
        publisher.publish_raw(large, attributes_for(play, "large-1", int(time.time() * 1000)))
        after = [publisher.publish(valid_fields(play, seed)) for seed in range(5, 10)]
        publisher.flush()
        audit = _wait_until_accounted(root, published=11, timeout_seconds=CLOSE_TIMEOUT_SECONDS)
        assert job.process.poll() is None, f"the job died:\n{job.log_tail()}"
    finally:
        stop_jobs([job])

    assert not audit.problems and audit.settled, "every hour with data closed"
    assert_every_id_in_one_place(root, "play", [*before, "large-1", *after], dead_lettered=["large-1"])
    kinds = collections.Counter()
    for hour in audit.hours.values():
        kinds.update(hour.dead_letter_kinds)
    assert +kinds == {"too_large": 1}


def _wait_until_accounted(root, published: int, timeout_seconds: float):
    """The audit once every published message is accounted for and every hour closed."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        audit = audit_type(Layout.under(root, "play", WINDOW))
        accounted = sum(audit.total(k) for k in ("delivered", "duplicates", "late", "dead_lettered"))
        if (accounted == published and audit.settled) or time.monotonic() > deadline:
            return audit
        time.sleep(1)

"""Streaming latency on the emulators: from publish to the record being readable in its final file.

One delivery job (``play``) runs on the DirectRunner with 10-second buckets, 2 seconds of
lateness and a 1-second trigger. Events are published at a steady rate with ``received_at``
stamped at publish time; the delivered folders are polled, and each record's latency is the
time its id was first readable in a published (marked) hour folder, and, for reference, in
a staged file, minus its publish time.
"""

from __future__ import annotations

import pathlib
import random
import statistics
import time

from event_delivery.cloud import files
from event_delivery.cloud.clients import use_emulator_credentials
from event_delivery.contract import partitions
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import load_registry
from event_delivery.contract.samples import fake_fields
from event_delivery.keys.config import KeyConfig
from event_delivery.producer import EventPublisher
from tools.local.emulators import running_emulators
from tools.local.jobs import start_job, stop_jobs
from tools.ops import provision

PROJECT, BUCKET, TYPE = "local-project", "event-delivery-bench", "play"
WINDOW, LATENESS, TRIGGER = 10, 2, 1


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _first_seen(pattern: str, seen: dict, already: set) -> None:
    now = time.time()
    for path in files.glob(pattern):
        if path in already:
            continue
        try:
            records = files.read_avro(path)
        except Exception:
            if files.exists(path):
                raise
            continue  # a close moved it after the listing: its records turn up in the hour's folder
        already.add(path)
        for record in records:
            seen.setdefault(record["event_id"], now)


def measure(state_dir: pathlib.Path, seconds: float = 40, rate: float = 20, say=print) -> dict:
    """Runs the job and the publisher; returns p50/p95 latencies in seconds."""
    event_type = load_registry()[TYPE]
    with running_emulators(state_dir):
        use_emulator_credentials()
        provision.provision(PROJECT, [event_type], BUCKET)
        KeyConfig(f"sqlite:///{state_dir.resolve()}/keystore.db", f"{state_dir.resolve()}/kek.key").provision()
        root = f"gs://{BUCKET}"
        layout = Layout.under(root, TYPE, WINDOW)
        staging, delivered = (partitions.join(r, TYPE, "*", "*", "*.avro") for r in (layout.staging, layout.delivered))
        args = [
            f"--project={PROJECT}",
            f"--storage_root={root}",
            f"--window_seconds={WINDOW}",
            f"--allowed_lateness_seconds={LATENESS}",
            f"--trigger_seconds={TRIGGER}",
            "--num_shards=2",
            f"--keystore=sqlite:///{state_dir.resolve()}/keystore.db",
            f"--local_key_file={state_dir.resolve()}/kek.key",
        ]
        job = start_job(TYPE, args, state_dir / "logs")
        published, final, staged, final_files, staged_files = {}, {}, {}, set(), set()
        try:
            job.wait_ready()
            publisher, rng = EventPublisher(PROJECT, event_type), random.Random(3)
            started = time.time()
            while time.time() - started < seconds:
                event_id = f"lat-{len(published):06d}"
                publisher.publish(fake_fields(event_type, rng, 1000), event_id)
                publisher.flush()
                published[event_id] = time.time()
                _first_seen(staging, staged, staged_files)
                time.sleep(max(0.0, started + len(published) / rate - time.time()))
            say(f"  latency: published {len(published)} events; waiting for the last hour to close")
            deadline = time.time() + WINDOW + LATENESS + 60
            while time.time() < deadline and len(final) < len(published):
                _first_seen(staging, staged, staged_files)
                _first_seen(delivered, final, final_files)
                time.sleep(0.25)
        finally:
            stop_jobs([job])
    to_final = [final[i] - t for i, t in published.items() if i in final]
    to_staged = [staged[i] - t for i, t in published.items() if i in staged]
    return {
        "events": len(published),
        "readable_in_final_file": len(to_final),
        "final_p50_seconds": statistics.median(to_final),
        "final_p95_seconds": percentile(to_final, 0.95),
        "staged_p50_seconds": statistics.median(to_staged) if to_staged else None,
        "staged_p95_seconds": percentile(to_staged, 0.95) if to_staged else None,
        "window_seconds": WINDOW,
        "allowed_lateness_seconds": LATENESS,
        "trigger_seconds": TRIGGER,
    }

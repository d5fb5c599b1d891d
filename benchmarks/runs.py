"""One measured run, in a process of its own: the floor, or the backfill pipeline.

    python -m benchmarks.runs floor --events 200000
    python -m benchmarks.runs pipeline --events 200000 --workers 2

Prints one JSON line: events read, seconds, and peak resident memory (this process and
its worker processes). The workload is built first if it is not there yet.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import shutil
import sys
import tempfile
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from benchmarks import floor, workload
from event_delivery.contract.partitions import HOUR_SECONDS, Layout
from event_delivery.contract.registry import load_registry
from pipelines.backfill import Backfill
from pipelines.runtime import LOCAL_BATCH_RUNNER
from transforms.settings import DeliverySettings

WORKLOADS = pathlib.Path(__file__).parent / ".workloads"


def workload_for(events: int) -> workload.Workload:
    return workload.build(WORKLOADS / f"{events}-v{workload.FORMAT}", events)


def run_pipeline(work: workload.Workload, out: pathlib.Path, workers: int) -> int:
    """The backfill job over the whole workload: one branch per type, as one Beam job."""
    options = PipelineOptions(
        flags=[],
        runner=LOCAL_BATCH_RUNNER,
        direct_num_workers=workers,
        direct_running_mode="multi_processing" if workers > 1 else "in_memory",
    )
    registry = load_registry()
    with beam.Pipeline(options=options) as pipeline:
        for name in workload.MIX:
            event_type = registry[name]
            settings = DeliverySettings(
                event_type,
                layout=Layout.under(str(out), name, HOUR_SECONDS),
                keys=work.keys,
                allowed_lateness_seconds=event_type.tier.allowed_lateness_seconds,
                num_shards=event_type.tier.num_shards,
                trigger_seconds=None,
                run_id="bench",
            )
            pipeline | f"Backfill {name}" >> Backfill(work.archive_paths(name), settings)
    return work.events


def peak_rss_bytes() -> int:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + workers) * 1024  # Linux reports KiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runs", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["floor", "pipeline"])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--start_at", type=float, help="Wall-clock time (epoch seconds) to start at, so that copies run side by side."
    )
    args = parser.parse_args(argv)
    work = workload_for(args.events)
    out = pathlib.Path(tempfile.mkdtemp(prefix=f"bench-{args.what}-"))
    if args.start_at:
        time.sleep(max(0.0, args.start_at - time.time()))
    try:
        started = time.perf_counter()
        events = floor.run_floor(work, out) if args.what == "floor" else run_pipeline(work, out, args.workers)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(
        json.dumps(
            {
                "what": args.what,
                "workers": args.workers,
                "events": events,
                "seconds": seconds,
                "peak_rss_bytes": peak_rss_bytes(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One measured run, in a process of its own: the plain loop, the floor, the backfill
pipeline, the streaming path, or the streaming path's keyed step alone.

    python -m benchmarks.runs plain_loop --events 200000
    python -m benchmarks.runs floor --events 200000
    python -m benchmarks.runs pipeline --events 200000 --workers 2
    python -m benchmarks.runs streaming --events 200000 [--ledger]
    python -m benchmarks.runs keyed_steps --events 200000
    python -m benchmarks.runs pipeline --events 200000 --codec zstandard

Prints one JSON line: events read, seconds, CPU seconds and peak resident memory (this
process and its worker processes), and the bytes of the files it published (delivered,
late and dead-letter, in ``--codec``); with ``--ledger``, the streaming path's cost ledger too (see
``benchmarks.ledger``; counting slows the run, so its seconds are not a measurement); for
``keyed_steps``, what it kept and dropped as repeats (see ``benchmarks.keyed_steps``).
The workload is built first if it is not there yet.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import resource
import shutil
import sys
import tempfile
import time

import apache_beam as beam
import fastavro
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import worker_handlers

from benchmarks import floor, keyed_steps, ledger, plain_loop, workload
from event_delivery.cloud import files
from event_delivery.contract.partitions import HOUR_SECONDS, Layout
from event_delivery.contract.registry import load_registry
from pipelines.backfill import Backfill
from pipelines.runtime import LOCAL_BATCH_RUNNER
from tools.ops import job_flags
from transforms.settings import DeliverySettings

WORKLOADS = pathlib.Path(__file__).parent / ".workloads"


def workload_for(events: int) -> workload.Workload:
    return workload.build(WORKLOADS / f"{events}-v{workload.FORMAT}", events)


# The streaming path fires a pane per this many events of a (shard, writer) key, in place of
# its processing-time trigger, which the batch runner has no clock for. A minute of one
# key at 1M events/s over 1,600 keys is ~600 events.
PANE_EVENTS = 600


def _as_deployed() -> None:
    """The state cache of this process's SDK harness sized as the deployed jobs size it
    (``job_flags.SDK_STATE_CACHE_MB``, none). The in-process runner hard-codes 100 MB, which
    made the streaming path 3.7x slower than the SDK harness runs it on Dataflow; worker
    processes take the size from the job's options."""
    worker_handlers.STATE_CACHE_SIZE_MB = job_flags.SDK_STATE_CACHE_MB


def _pipeline(
    work: workload.Workload,
    out: pathlib.Path,
    workers: int,
    streaming: bool,
    runner=None,
    codec=files.AVRO_CODEC,
    branch=None,
) -> beam.Pipeline:
    """The delivery path over the whole workload, one branch per type, as one Beam job: the
    backfill's (bounded: one pane per hour and shard) or the streaming job's (every stateful
    step: repeat marks, panes, deduplication, the close), fed from the archive; or ``branch(name,
    settings)`` in its place, with the streaming job's settings."""
    _as_deployed()
    options = PipelineOptions(
        flags=[],
        runner=LOCAL_BATCH_RUNNER,
        direct_num_workers=workers,
        direct_running_mode="multi_processing" if workers > 1 else "in_memory",
        max_cache_memory_usage_mb=job_flags.SDK_STATE_CACHE_MB,
    )
    registry = load_registry()
    pipeline = beam.Pipeline(runner=runner, options=options)
    for name in workload.MIX:
        event_type = registry[name]
        settings = DeliverySettings(
            event_type,
            layout=Layout.under(str(out), name, HOUR_SECONDS),
            keys=work.keys,
            allowed_lateness_seconds=event_type.tier.allowed_lateness_seconds,
            num_shards=event_type.tier.num_shards,
            trigger_seconds=60 if streaming else None,
            trigger_events=PANE_EVENTS if streaming else None,
            run_id="bench",
            codec=codec,
        )
        path = branch(name, settings) if branch else Backfill(work.archive_paths(name), settings)
        pipeline | f"{_BRANCH[streaming]} {name}" >> path
    return pipeline


_BRANCH = {False: "Backfill", True: "Stream"}


def run_pipeline(
    work: workload.Workload, out: pathlib.Path, workers: int, streaming: bool = False, codec=files.AVRO_CODEC
) -> int:
    _pipeline(work, out, workers, streaming, codec=codec).run().wait_until_finish()
    return work.events


def run_keyed_steps(work: workload.Workload, out: pathlib.Path) -> dict[str, int]:
    """The streaming path's keyed step alone (``benchmarks.keyed_steps``), its events loaded before;
    returns what it kept and dropped as repeats."""
    result = _pipeline(work, out, 1, streaming=True, branch=keyed_steps.KeyedSteps).run()
    result.wait_until_finish()
    return keyed_steps.counted(result)


def published_files(out: pathlib.Path) -> list[pathlib.Path]:
    """The delivered, late and dead-letter files under ``out`` (not staging, nor the id index)."""
    folders = [out / root for root in ("delivered", "late", "dead-letter")]
    return [path for folder in folders for path in sorted(folder.glob("*/dt=*/hr=*/*.avro"))]


def published_bytes(out: pathlib.Path) -> int:
    return sum(path.stat().st_size for path in published_files(out))


def compression_seconds(out: pathlib.Path, codec: str) -> float:
    """The CPU that compressing the published files' blocks in ``codec`` takes, alone: the codec's own
    share of the run, which the pipeline's CPU holds too, in the noise of everything else it does."""
    decoded = []
    for path in published_files(out):
        with path.open("rb") as handle:
            blocks = fastavro.block_reader(handle)
            decoded.append((blocks.writer_schema, list(blocks)))  # decompressed as read
    started = time.process_time()
    for schema, blocks in decoded:
        writer = fastavro.write.Writer(io.BytesIO(), schema, codec=codec)
        for block in blocks:
            writer.write_block(block)  # compressed here
        writer.flush()
    return time.process_time() - started


def run_ledger(work: workload.Workload, out: pathlib.Path) -> dict:
    """The streaming path's cost ledger per type (one worker, counted as it runs)."""
    runner = ledger.KeepingRunner()
    pipeline = _pipeline(work, out, 1, streaming=True, runner=runner)
    with ledger.counting() as tally:
        result = pipeline.run()
        result.wait_until_finish()
    sizes = ledger.sizes_by_pcollection(result)
    return {
        name: ledger.ledger(
            runner.proto, sizes, tally, work.counts[name], f"Stream {name}/", "ParseEvents", "StageDelivered"
        )
        for name in workload.MIX
    }


def cpu_seconds() -> float:
    """User and system CPU of this process and its worker processes."""
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def peak_rss_bytes() -> int:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + workers) * 1024  # Linux reports KiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.runs", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["plain_loop", "floor", "pipeline", "streaming", "keyed_steps"])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--ledger", action="store_true", help="Count the streaming path's cost ledger (slower).")
    parser.add_argument("--codec", default=files.AVRO_CODEC, choices=files.CODECS, help="The files' Avro codec.")
    parser.add_argument(
        "--start_at", type=float, help="Wall-clock time (epoch seconds) to start at, so that copies run side by side."
    )
    args = parser.parse_args(argv)
    work = workload_for(args.events)
    out = pathlib.Path(tempfile.mkdtemp(prefix=f"bench-{args.what}-"))
    if args.start_at:
        time.sleep(max(0.0, args.start_at - time.time()))
    try:
        prepared = plain_loop.prepare(work) if args.what == "plain_loop" else None  # before the clock: see there
        if args.what == "keyed_steps":
            keyed_steps.load_events(work)  # before the clock too
        started, cpu_before = time.perf_counter(), cpu_seconds()
        extra = {}
        if prepared:
            events = plain_loop.run_plain_loop(prepared, out)
        elif args.what == "floor":
            events = floor.run_floor(work, out)
        elif args.what == "keyed_steps":
            events, extra = work.events, {"counted": run_keyed_steps(work, out)}
        elif args.ledger:
            events, extra = work.events, {"ledger": run_ledger(work, out)}
        else:
            events = run_pipeline(work, out, args.workers, streaming=args.what == "streaming", codec=args.codec)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_before
        output_bytes, compression = published_bytes(out), compression_seconds(out, args.codec)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(
        json.dumps(
            {
                "what": args.what,
                "workers": args.workers,
                "events": events,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "output_bytes": output_bytes,
                "compression_cpu_seconds": compression,
                "peak_rss_bytes": peak_rss_bytes(),
                **extra,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

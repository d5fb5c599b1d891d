"""make bench: the delivery path's cost per event, side by side with the floor and the plain loop.

    python -m benchmarks.bench [--events 200000] [--rounds 3] [--skip_latency] [--codecs_only]

Each measurement runs in a fresh process, and the rounds interleave the plain loop (the
essential work alone: the lower bound), the floor, two floors at once (how far this
machine's cores scale the same work with nothing shared), the bounded pipeline (the
backfill) with 1 worker and with 2 workers, the streaming path with 1 worker, and its keyed
step alone (``benchmarks.keyed_steps``: Beam's work on it, which no step's code can cut), so a
noisy neighbour hits them all alike; the table quotes medians.
One more streaming run counts its cost ledger per event (``benchmarks.ledger``). Peak
memory comes from single 1-worker runs at 1x, 2x and 4x the workload; one 2-worker run
at 4x beside the last shows how scaling grows as the job's fixed cost weighs less. The
codecs (``--codec``) are compared on the bounded pipeline, one run of each per round,
interleaved: the bytes it published and its CPU, per event.
Streaming latency is measured on the emulators. Writes benchmarks/results.json and
benchmarks/results.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import latency
from benchmarks.report import chart, codec_table, table
from benchmarks.runs import workload_for
from event_delivery.cloud import files

HERE = pathlib.Path(__file__).parent
COPIES_START_SECONDS = 10  # enough for each copy to start Python and load the workload


def _command(what: str, events: int, workers: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.runs", what, "--events", str(events), "--workers", str(workers), *flags]


def _result(command: list[str], returncode: int, stdout: str, stderr: str) -> dict:
    if returncode:
        raise RuntimeError(f"{' '.join(command[2:])} failed:\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def measured(what: str, events: int, workers: int = 1, *flags: str) -> dict:
    command = _command(what, events, workers, *flags)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    return _result(command, result.returncode, result.stdout, result.stderr)


def measured_together(what: str, events: int, copies: int) -> dict:
    """``copies`` runs at once, each a process of its own that starts its work at the same
    moment: how far this machine's cores scale the same work when nothing is shared.
    Events are those of all of them; seconds, the slowest one's."""
    command = [*_command(what, events, 1), "--start_at", str(time.time() + COPIES_START_SECONDS)]
    processes = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(copies)
    ]
    outputs = [p.communicate() for p in processes]
    runs = [_result(command, p.returncode, *output) for p, output in zip(processes, outputs, strict=True)]
    return {
        "events": events * copies,
        "seconds": max(r["seconds"] for r in runs),
        "peak_rss_bytes": sum(r["peak_rss_bytes"] for r in runs),
    }


def throughput(events: int, rounds: int, say) -> dict:
    plan = (
        ("plain_loop", lambda: measured("plain_loop", events)),
        ("floor", lambda: measured("floor", events)),
        ("floor_2_at_once", lambda: measured_together("floor", events, 2)),
        ("pipeline_1_worker", lambda: measured("pipeline", events, 1)),
        ("pipeline_2_workers", lambda: measured("pipeline", events, 2)),
        ("streaming_1_worker", lambda: measured("streaming", events, 1)),
        ("streaming_keyed_steps", lambda: measured("keyed_steps", events, 1)),
    )
    runs = {name: [] for name, _ in plan}
    for round_number in range(1, rounds + 1):
        for name, measure in plan:
            run = measure()
            runs[name].append(run)
            rate = run["events"] / run["seconds"]
            say(f"  round {round_number}/{rounds}: {name:<19} {run['seconds']:7.1f}s  {rate:8.0f} events/s")
    return {
        name: {
            "events": results[0]["events"],
            "seconds": [r["seconds"] for r in results],
            "median_seconds": statistics.median(r["seconds"] for r in results),
            "events_per_second": results[0]["events"] / statistics.median(r["seconds"] for r in results),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
        }
        for name, results in runs.items()
    }


def codecs(events: int, rounds: int, say) -> dict:
    """Per codec, the bounded pipeline's published bytes and CPU per event (medians of
    interleaved rounds, so that a noisy neighbour hits each codec alike)."""
    runs = {codec: [] for codec in files.CODECS}
    for round_number in range(1, rounds + 1):
        for codec in files.CODECS:
            run = measured("pipeline", events, 1, "--codec", codec)
            runs[codec].append(run)
            say(
                f"  round {round_number}/{rounds}: {codec:<10} {run['output_bytes'] / events:7.1f} bytes/event  "
                f"{run['cpu_seconds'] / events * 1e6:7.1f} CPU µs/event, "
                f"{run['compression_cpu_seconds'] / events * 1e6:5.2f} of it compressing"
            )
    return {
        codec: {
            "events": events,
            "output_bytes_per_event": statistics.median(r["output_bytes"] for r in results) / events,
            "cpu_microseconds_per_event": statistics.median(r["cpu_seconds"] for r in results) / events * 1e6,
            "compression_microseconds_per_event": statistics.median(r["compression_cpu_seconds"] for r in results)
            / events
            * 1e6,
            "events_per_second": events / statistics.median(r["seconds"] for r in results),
        }
        for codec, results in runs.items()
    }


def cost_ledger(events: int, say) -> dict:
    """The streaming path's ledger per event over the whole mix: each type's totals, summed."""
    by_type = measured("streaming", events, 1, "--ledger")["ledger"]
    counted = ("elements", "bytes", "state_reads", "state_writes", "timers_set", "keys")
    steps = {}
    for costs in by_type.values():
        for step in costs["steps"]:
            total = steps.setdefault(step["step"], {"step": step["step"], "carries_events": step["carries_events"]})
            for field in counted:
                total[field] = total.get(field, 0) + step[field]
    per_event = {field: sum(step[field] for step in steps.values()) / events for field in counted[1:]}
    per_event["shuffles"] = max(costs["per_event"]["shuffles"] for costs in by_type.values())
    say("  per event: " + ", ".join(f"{field} {value:.2f}" for field, value in per_event.items()))
    return {"events": events, "per_event": per_event, "steps": sorted(steps.values(), key=lambda s: -s["bytes"])}


def memory(events: int, say) -> dict:
    growth = {}
    for factor in (1, 2, 4):
        workload_for(events * factor)  # built outside the measured process
        run = measured("pipeline", events * factor, 1)
        growth[f"{factor}x"] = {"events": events * factor, "peak_rss_bytes": run["peak_rss_bytes"], **_rate(run)}
        say(f"  memory {factor}x ({events * factor} events): peak {run['peak_rss_bytes'] / 2**20:.0f} MiB")
    return growth


def scaling_at(one_worker: dict, say) -> dict:
    """2 workers on the workload of a 1-worker ``memory`` run, once: how much of the
    shortfall of 2 workers is the job's fixed cost (building it, starting worker
    processes), which weighs less the more events there are."""
    events = one_worker["events"]
    two = _rate(measured("pipeline", events, 2))
    scaling = two["events_per_second"] / one_worker["events_per_second"]
    say(f"  {events} events: 1 worker {one_worker['seconds']:.1f}s, 2 workers {two['seconds']:.1f}s: {scaling:.2f}x")
    return {"events": events, "pipeline_2_workers": two, "scaling": scaling}


def _rate(run: dict) -> dict:
    return {"seconds": run["seconds"], "events_per_second": run["events"] / run["seconds"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="Workload size. Default: 200000.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds; medians are quoted. Default: 3.")
    parser.add_argument("--skip_latency", action="store_true", help="Skip the streaming latency (needs emulators).")
    parser.add_argument("--output", type=pathlib.Path, default=HERE, help="Where results.json/.png go.")
    parser.add_argument(
        "--codecs_only",
        action="store_true",
        help="Compare the codecs only (bytes and CPU per event); print their table, write no results.",
    )
    args = parser.parse_args(argv)
    if args.events < 1000 or args.rounds < 1:
        parser.error("--events must be at least 1000 and --rounds at least 1")
    say = lambda line: print(line, flush=True)  # noqa: E731
    started = time.monotonic()
    say(f"workload: {args.events} events (built once, then reused from benchmarks/.workloads/)")
    work = workload_for(args.events)
    if args.codecs_only:
        say(f"codecs: {args.rounds} interleaved rounds")
        say("\n" + codec_table(codecs(args.events, args.rounds, say)))
        return 0
    say(f"throughput: {args.rounds} interleaved rounds")
    results = {
        "command": " ".join(["make bench", *(argv or sys.argv[1:])]),
        "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "events": args.events,
        "workload": {k: v for k, v in work.counts.items()},
        "throughput": throughput(args.events, args.rounds, say),
    }
    say("cost ledger of the streaming path")
    results["ledger"] = cost_ledger(args.events, say)
    say(f"codecs: {args.rounds} interleaved rounds of the bounded pipeline")
    results["codecs"] = codecs(args.events, args.rounds, say)
    say("memory: 1-worker pipeline at 1x, 2x and 4x")
    results["memory"] = memory(args.events, say)
    say("scaling at 4x: 2 workers, once")
    results["scaling_at_4x"] = scaling_at(results["memory"]["4x"], say)
    if not args.skip_latency:
        say("streaming latency on the emulators")
        with tempfile.TemporaryDirectory(prefix="bench-latency-") as state:
            results["latency"] = latency.measure(pathlib.Path(state), say=say)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    chart(results, args.output / "results.png")
    say("")
    say(table(results))
    say(f"\nwrote {args.output / 'results.json'} and results.png in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

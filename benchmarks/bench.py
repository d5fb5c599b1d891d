"""make bench: the delivery path's cost per event, side by side with the floor and the plain loop.

    python -m benchmarks.bench [--events 200000] [--rounds 3] [--skip_latency] [--codecs_only]

Each measurement runs in a fresh process, and the rounds interleave the plain loop (the
essential work alone: the lower bound), the floor, two floors at once (how far this
machine's cores scale the same work with nothing shared), the bounded pipeline (the
backfill) with 1 worker and with 2 workers, the streaming path with 1 worker, its two keyed
steps alone and ``MarkRepeats`` alone (``benchmarks.keyed_steps``: Beam's work on them, which
no step's code can cut), so a noisy neighbour hits them all alike; the table quotes medians.
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
from benchmarks.runs import workload_for
from event_delivery.cloud import files

HERE = pathlib.Path(__file__).parent
PEAK_EVENTS_PER_SECOND = 8_000_000
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
        ("streaming_mark_repeats", lambda: measured("keyed_steps", events, 1, "--steps", "mark_repeats")),
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


def codec_table(by_codec: dict) -> str:
    deflate = by_codec[files.AVRO_CODEC]
    lines = [
        "| --codec | bytes/event | x deflate | CPU µs/event | x deflate | compressing, µs | x deflate | events/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for codec, run in by_codec.items():
        size, cpu = run["output_bytes_per_event"], run["cpu_microseconds_per_event"]
        compressing = run["compression_microseconds_per_event"]
        lines.append(
            f"| {codec} | {size:,.1f} | {size / deflate['output_bytes_per_event']:.2f} | {cpu:,.1f} | "
            f"{cpu / deflate['cpu_microseconds_per_event']:.2f} | {compressing:,.2f} | "
            f"{compressing / deflate['compression_microseconds_per_event']:.2f} | {run['events_per_second']:,.0f} |"
        )
    return "\n".join(lines)


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


def table(results: dict) -> str:
    t, m = results["throughput"], results["memory"]
    floor, one, two = t["floor"], t["pipeline_1_worker"], t["pipeline_2_workers"]
    loop = t.get("plain_loop")  # results from before the plain loop have none
    keyed, mark = t.get("streaming_keyed_steps"), t.get("streaming_mark_repeats")  # nor those from before them
    rows = (  # label, run, cores it used
        *((("plain loop (the essential work alone)", loop, 1),) if loop else ()),
        ("floor (the path's work in one loop)", floor, 1),
        ("floor, 2 copies at once", t["floor_2_at_once"], 2),
        ("bounded pipeline, 1 worker", one, 1),
        ("bounded pipeline, 2 workers", two, 2),
        ("streaming path, 1 worker", t["streaming_1_worker"], 1),
        *((("its two keyed steps alone (Beam's work on them)", keyed, 1),) if keyed else ()),
        *((("`MarkRepeats` alone", mark, 1),) if mark else ()),
    )
    header = ("run", "events/s", "x floor", "peak MiB", f"vCPUs for {PEAK_EVENTS_PER_SECOND / 1e6:.0f}M/s")
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|"]
    for label, run, cores in rows:
        rate = run["events_per_second"]
        lines.append(
            f"| {label} | {rate:,.0f} | {rate / floor['events_per_second']:.2f} | "
            f"{run['peak_rss_bytes'] / 2**20:,.0f} | {PEAK_EVENTS_PER_SECOND / (rate / cores):,.0f} |"
        )
    out = "\n".join(lines)
    if loop:
        out += f"\n\n- The floor runs at {floor['events_per_second'] / loop['events_per_second']:.2f}x the plain loop."
    if keyed and mark:
        streaming = t["streaming_1_worker"]["events_per_second"]
        out += (
            f"\n- The streaming path's two keyed steps alone take {streaming / keyed['events_per_second']:.0%} "
            f"of its time per event, `MarkRepeats` alone {streaming / mark['events_per_second']:.0%}: with nothing "
            f"else to do, the path would run at {keyed['events_per_second'] / floor['events_per_second']:.2f}x "
            "the floor."
        )
    out += (
        f"\n\n- Scaling from 1 to 2 workers: {two['events_per_second'] / one['events_per_second']:.2f}x; "
        f"this machine's own scaling of the same work, two floors at once: "
        f"{t['floor_2_at_once']['events_per_second'] / floor['events_per_second']:.2f}x."
    )
    if results.get("scaling_at_4x"):
        larger = results["scaling_at_4x"]
        out += f" At {larger['events']:,} events (one run each): {larger['scaling']:.2f}x."
    out += "\n- Peak memory of the 1-worker pipeline: " + ", ".join(
        f"{k} ({v['events']:,} events) {v['peak_rss_bytes'] / 2**20:,.0f} MiB" for k, v in m.items()
    )
    if results.get("ledger"):
        costs = results["ledger"]["per_event"]
        out += (
            f"\n- Streaming path, per event: {costs['shuffles']} keyed shuffles, {costs['bytes']:,.0f} bytes shuffled, "
            f"{costs['state_reads']:.2f} state reads, {costs['state_writes']:.2f} state writes, "
            f"{costs['timers_set']:.2f} timers set, {costs['keys']:.2f} keys."
        )
    if results.get("latency"):
        lat = results["latency"]
        out += (
            f"\n- Streaming latency, publish to readable in the final file ({lat['window_seconds']} s buckets, "
            f"{lat['allowed_lateness_seconds']} s lateness, {lat['trigger_seconds']} s trigger, "
            f"{lat['events']} events): p50 {lat['final_p50_seconds']:.1f} s, p95 {lat['final_p95_seconds']:.1f} s"
        )
        if lat.get("staged_p50_seconds") is not None:
            out += (
                f"; readable in staging: p50 {lat['staged_p50_seconds']:.1f} s, p95 {lat['staged_p95_seconds']:.1f} s"
            )
        out += "."
    if results.get("codecs"):
        out += "\n\nPer codec (bounded pipeline, 1 worker; delivered, late and dead-letter files):\n\n"
        out += codec_table(results["codecs"])
    return out


def chart(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    t, m = results["throughput"], results["memory"]
    figure, (rates, peaks) = pyplot.subplots(1, 2, figsize=(14, 4), gridspec_kw={"width_ratios": [2, 1]})
    names = ["plain_loop", "floor", "floor_2_at_once", "pipeline_1_worker", "pipeline_2_workers", "streaming_1_worker"]
    labels = [
        "plain\nloop",
        "floor",
        "2 floors\nat once",
        "bounded\n1 worker",
        "bounded\n2 workers",
        "streaming\n1 worker",
    ]
    colors = ["#555", "#888", "#bbb", "#1f77b4", "#2ca02c", "#d62728"]
    if "streaming_mark_repeats" in t:
        names += ["streaming_keyed_steps", "streaming_mark_repeats"]
        labels += ["keyed steps\nalone", "MarkRepeats\nalone"]
        colors += ["#f4a0a0", "#fbd0d0"]
    bars = rates.bar(labels, [t[n]["events_per_second"] for n in names], color=colors)
    rates.bar_label(bars, fmt="{:,.0f}")
    rates.set_ylabel("events/s (median)")
    rates.set_title(f"Throughput, {results['events']:,} events")
    sizes = [v["events"] for v in m.values()]
    peaks.plot(sizes, [v["peak_rss_bytes"] / 2**20 for v in m.values()], marker="o")
    peaks.set_xlabel("events in the workload")
    peaks.set_ylabel("peak RSS, MiB")
    peaks.set_ylim(bottom=0)
    peaks.set_title("Memory of the 1-worker pipeline")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


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

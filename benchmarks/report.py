"""make bench's report: the tables it prints and docs/performance.md quotes, and its chart."""

from __future__ import annotations

import pathlib

from event_delivery.cloud import files

PEAK_EVENTS_PER_SECOND = 8_000_000


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


def rates_table(t: dict) -> str:
    """The throughput runs' rates, against the floor, with their peak memory and the vCPUs 8M events/s would take."""
    floor = t["floor"]
    loop = t.get("plain_loop")  # results from before the plain loop have none
    keyed = t.get("streaming_keyed_steps")  # nor those from before it
    rows = (  # label, run, cores it used
        *((("plain loop (the essential work alone)", loop, 1),) if loop else ()),
        ("floor (the path's work in one loop)", floor, 1),
        ("floor, 2 copies at once", t["floor_2_at_once"], 2),
        ("bounded pipeline, 1 worker", t["pipeline_1_worker"], 1),
        ("bounded pipeline, 2 workers", t["pipeline_2_workers"], 2),
        ("streaming path, 1 worker", t["streaming_1_worker"], 1),
        *((("its keyed step alone (Beam's work on it)", keyed, 1),) if keyed else ()),
    )
    header = ("run", "events/s", "x floor", "peak MiB", f"vCPUs for {PEAK_EVENTS_PER_SECOND / 1e6:.0f}M/s")
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|"]
    for label, run, cores in rows:
        rate = run["events_per_second"]
        lines.append(
            f"| {label} | {rate:,.0f} | {rate / floor['events_per_second']:.2f} | "
            f"{run['peak_rss_bytes'] / 2**20:,.0f} | {PEAK_EVENTS_PER_SECOND / (rate / cores):,.0f} |"
        )
    return "\n".join(lines)


def shares(t: dict) -> str:
    """The floor against the plain loop, and the streaming path's time that its keyed steps alone take."""
    floor, loop = t["floor"]["events_per_second"], t.get("plain_loop")
    keyed = t.get("streaming_keyed_steps")
    out = f"\n\n- The floor runs at {floor / loop['events_per_second']:.2f}x the plain loop." if loop else ""
    if keyed:
        streaming = t["streaming_1_worker"]["events_per_second"]
        out += (
            f"\n- The streaming path's keyed step alone takes {streaming / keyed['events_per_second']:.0%} "
            f"of its time per event: with nothing else to do, the path would run at "
            f"{keyed['events_per_second'] / floor:.2f}x the floor."
        )
    return out


def latency_line(lat: dict) -> str:
    out = (
        f"\n- Streaming latency, publish to readable in the final file ({lat['window_seconds']} s buckets, "
        f"{lat['allowed_lateness_seconds']} s lateness, {lat['trigger_seconds']} s trigger, "
        f"{lat['events']} events): p50 {lat['final_p50_seconds']:.1f} s, p95 {lat['final_p95_seconds']:.1f} s"
    )
    if lat.get("staged_p50_seconds") is not None:
        out += f"; readable in staging: p50 {lat['staged_p50_seconds']:.1f} s, p95 {lat['staged_p95_seconds']:.1f} s"
    return out + "."


def table(results: dict) -> str:
    t, m = results["throughput"], results["memory"]
    floor, one, two = t["floor"], t["pipeline_1_worker"], t["pipeline_2_workers"]
    out = rates_table(t) + shares(t)
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
            f"\n- Streaming path, per event: {costs['shuffles']} keyed shuffle{'s' * (costs['shuffles'] != 1)}, "
            f"{costs['bytes']:,.0f} bytes shuffled, "
            f"{costs['state_reads']:.2f} state reads, {costs['state_writes']:.2f} state writes, "
            f"{costs['timers_set']:.2f} timers set, {costs['keys']:.2f} keys."
        )
    if results.get("latency"):
        out += latency_line(results["latency"])
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
    if "streaming_keyed_steps" in t:
        names += ["streaming_keyed_steps"]
        labels += ["keyed step\nalone"]
        colors += ["#f4a0a0"]
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

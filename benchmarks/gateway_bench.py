"""make gateway-bench: the gateway's throughput and latency on 127.0.0.1, healthy and through an outage.

    python -m benchmarks.gateway_bench [--seconds 15] [--concurrency 32] [--outage_seconds 10]

It starts a Pub/Sub emulator and a gateway (``python -m gateway``) of its own, and clients
that post one event per request, round robin over every type, as fast as the gateway answers:

1. healthy, for ``--seconds``: requests/s, requests per second of the gateway's own CPU time
   (per core: the gateway is one process), p50 and p99 latency, and the share of non-200;
2. outage: the same load while the emulator is stopped (SIGSTOP) for ``--outage_seconds``,
   then resumed: the share of ``high`` answered 200, of ``low`` shed, the recovery time
   (from the resume until the spill is empty), and how many ids answered 200 never reached
   their topic (pulled back from a read-back subscription).

The clients share the machine with the gateway and the emulator: on a small machine the
figures are a floor. Writes benchmarks/gateway_results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import pathlib
import random
import statistics
import tempfile
import time

import aiohttp

from event_delivery.contract.registry import load_registry
from event_delivery.contract.samples import fake_fields
from tools.local.gateway_process import Gateway, paused, pubsub_emulator, pull_all

RESULTS = pathlib.Path(__file__).parent / "gateway_results.json"
BODIES_PER_TYPE = 200


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bodies() -> list[tuple[str, dict]]:
    rng = random.Random(7)
    return [(name, fake_fields(t, rng, 1000)) for name, t in load_registry().items() for _ in range(BODIES_PER_TYPE)]


async def load(port: int, concurrency: int, seconds: float, during=None) -> list[tuple]:
    """Posts for ``seconds`` (or until ``during`` returns); ``[(type, fields, status, latency, ids)]``."""
    url, sent, samples = f"http://127.0.0.1:{port}/v1/events/", [], bodies()
    random.Random(1).shuffle(samples)
    stop = asyncio.Event()

    async def client(session, number):
        for index in range(number, 1 << 62, concurrency):
            if stop.is_set():
                return
            name, fields = samples[index % len(samples)]
            started = time.perf_counter()
            async with session.post(url + name, json=fields) as response:
                body = await response.read()
            ids = json.loads(body)["ids"] if response.status == 200 else []
            sent.append((name, fields, response.status, time.perf_counter() - started, ids))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        clients = [asyncio.create_task(client(session, n)) for n in range(concurrency)]
        await (during() if during else asyncio.sleep(seconds))
        stop.set()
        await asyncio.gather(*clients)
    return sent


def healthy_figures(sent: list[tuple], seconds: float, cpu: float) -> dict:
    latencies = sorted(latency for *_, latency, _ in sent)
    quantiles = statistics.quantiles(latencies, n=100)
    return {
        "requests": len(sent),
        "requests_per_second": round(len(sent) / seconds),
        "requests_per_cpu_second": round(len(sent) / cpu),
        "p50_ms": round(quantiles[49] * 1000, 1),
        "p99_ms": round(quantiles[98] * 1000, 1),
        "non_200_share": sum(status != 200 for _, _, status, _, _ in sent) / len(sent),
    }


async def spill_events(session: aiohttp.ClientSession, port: int) -> float:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        lines = (await response.text()).splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("gateway_spill_events{"))


def outage_figures(gateway: Gateway, emulator, concurrency: int, outage: float) -> dict:
    recovery = {}

    async def with_outage():
        await asyncio.sleep(2)
        with paused(emulator):
            await asyncio.sleep(outage)
        resumed = time.monotonic()
        async with aiohttp.ClientSession() as session:
            while await spill_events(session, gateway.port) and time.monotonic() - resumed < 10 * outage:
                await asyncio.sleep(0.2)
        recovery["seconds"] = time.monotonic() - resumed
        await asyncio.sleep(1)

    sent = asyncio.run(load(gateway.port, concurrency, 0, during=with_outage))
    registry, by_tier = load_registry(), collections.defaultdict(collections.Counter)
    for name, _, status, _, _ in sent:
        by_tier[registry[name].tier.name][status] += 1
    accepted = {event_id: (name, fields) for name, fields, status, _, ids in sent if status == 200 for event_id in ids}
    received = pull_all(set(accepted), seconds=60)
    arrived = {attributes["event_id"] for messages in received.values() for _, attributes in messages}
    return {
        "outage_seconds": outage,
        "statuses_by_tier": {tier: dict(counts) for tier, counts in sorted(by_tier.items())},
        "high_accepted_share": by_tier["high"][200] / sum(by_tier["high"].values()),
        "low_shed_share": by_tier["low"][503] / sum(by_tier["low"].values()),
        "recovery_seconds": round(recovery["seconds"], 1),
        "accepted_ids": len(accepted),
        "accepted_ids_lost": len(set(accepted) - arrived),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gateway_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=15, help="The healthy run's length. Default: 15.")
    parser.add_argument("--concurrency", type=int, default=32, help="Requests in flight at once. Default: 32.")
    parser.add_argument("--outage_seconds", type=float, default=10, help="0 skips the outage. Default: 10.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch, pubsub_emulator(pathlib.Path(scratch)) as emulator:
        gateway = Gateway(pathlib.Path(scratch) / "spill")
        try:
            before, started = cpu_seconds(gateway.process.pid), time.monotonic()
            sent = asyncio.run(load(gateway.port, args.concurrency, args.seconds))
            elapsed, cpu = time.monotonic() - started, cpu_seconds(gateway.process.pid) - before
            results = {"cores": os.cpu_count(), "concurrency": args.concurrency}
            results["healthy"] = healthy_figures(sent, elapsed, cpu)
            if args.outage_seconds:
                results["outage"] = outage_figures(gateway, emulator, args.concurrency, args.outage_seconds)
        finally:
            gateway.stop()
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m gateway``: the command line, the preflight check, and serving until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import signal
import sys

from aiohttp import web

import gateway
from event_delivery.cloud import clients, preflight
from event_delivery.contract.partitions import check_window_seconds
from event_delivery.contract.registry import load_registry
from gateway.app import INTAKE, build_app
from gateway.settings import MIB, GatewaySettings

PROG = "python -m gateway"
_LOG = logging.getLogger("gateway")
# aiohttp answers 400 to a header past its own limits; they sit far above the gateway's
# --max_header_bytes, so that a large header gets the contract's 431 instead.
_PARSER_LIMITS = {"max_line_size": 256 * 1024, "max_field_size": 256 * 1024}


def positive(text: str) -> float:
    """An argparse type: a number above 0 (an int when written as one)."""
    value = float(text) if "." in text else int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not above 0")
    return value


def parse_args(argv=None) -> GatewaySettings:
    defaults = GatewaySettings(project="", spill_dir=pathlib.Path())
    parser = argparse.ArgumentParser(prog=PROG, description=gateway.__doc__.split("\n")[0])
    parser.add_argument("--project", required=True, help="The GCP project of the per-type topics.")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("PORT", defaults.port)), help="Default: $PORT, else 8080."
    )
    parser.add_argument("--host", default=defaults.host, help=f"Default: {defaults.host}.")
    parser.add_argument(
        "--spill_dir", type=pathlib.Path, required=True, help="Local disk for the SQLite spill; it survives restarts."
    )
    parser.add_argument(
        "--spill_max_mb",
        type=positive,
        default=defaults.spill_max_bytes // MIB,
        help="The spill's byte cap; 507 past it.",
    )
    parser.add_argument(
        "--publish_timeout_seconds",
        type=positive,
        default=defaults.publish_timeout_seconds,
        help="A publish not acknowledged in this time is spilled (high, normal) or shed (low). Default: 1.",
    )
    parser.add_argument(
        "--max_in_flight",
        type=positive,
        default=defaults.max_in_flight,
        help="Messages in flight to Pub/Sub, all types; low may use 30%%, normal 60%%. Default: 10000.",
    )
    parser.add_argument(
        "--max_event_bytes", type=positive, default=defaults.max_event_bytes, help="413 past it. Default: 1 MiB."
    )
    parser.add_argument(
        "--max_body_bytes", type=positive, default=defaults.max_body_bytes, help="413 past it. Default: 10 MiB."
    )
    parser.add_argument(
        "--window_seconds",
        type=int,
        default=defaults.window_seconds,
        help="The hours of the audit's count reports: the jobs' --window_seconds. Default: 3600.",
    )
    args = parser.parse_args(argv)
    try:
        check_window_seconds(args.window_seconds)
    except ValueError as error:
        parser.error(str(error))
    return GatewaySettings(
        project=args.project,
        spill_dir=args.spill_dir,
        host=args.host,
        port=args.port,
        spill_max_bytes=args.spill_max_mb * MIB,
        publish_timeout_seconds=args.publish_timeout_seconds,
        max_in_flight=args.max_in_flight,
        max_event_bytes=args.max_event_bytes,
        max_body_bytes=args.max_body_bytes,
        window_seconds=args.window_seconds,
    )


async def serve(settings: GatewaySettings) -> None:
    """Serves until SIGTERM or SIGINT, then stops taking requests and drains the spill."""
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None, **_PARSER_LIMITS)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    held = sum(usage.events for usage in app[INTAKE].spill.usage())
    where = os.environ.get(clients.PUBSUB_EMULATOR_HOST) or "Pub/Sub"
    _LOG.info(
        "gateway ready on http://%s:%d, publishing to %s in project %s; spill %s holds %d events",
        settings.host, settings.port, where, settings.project, settings.spill_path, held,
    )  # fmt: skip
    stop = asyncio.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signal_number, stop.set)
    await stop.wait()
    _LOG.info("gateway stopping: draining the spill")
    await runner.cleanup()


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = parse_args(argv)
    with preflight.exit_on_failure(PROG):
        for event_type in load_registry().values():
            preflight.check_topic(f"projects/{settings.project}/topics/{event_type.topic}")
    try:
        asyncio.run(serve(settings))
    except OSError as error:  # the port is taken, or the spill's folder cannot be written
        preflight.fail(PROG, str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())

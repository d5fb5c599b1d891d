"""The gateway's HTTP application: its routes, and the tasks that live as long as it does.

Routes: ``POST /v1/events/<type>``, ``GET /metrics``, ``GET /__heartbeat__``. Every answer
but a 200 carries a one-line plain-text reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time

from aiohttp import web

from event_delivery.contract.registry import load_registry
from event_delivery.producer import stamp
from gateway import checks, flusher
from gateway.checks import Refused
from gateway.intake import Intake
from gateway.metrics import UNKNOWN_TYPE, GatewayMetrics
from gateway.publishing import TypePublisher
from gateway.settings import GatewaySettings
from gateway.spill import Spill

INTAKE = web.AppKey("intake", Intake)
SETTINGS = web.AppKey("settings", GatewaySettings)
_LOG = logging.getLogger(__name__)


def refusal(error: Refused) -> web.Response:
    return web.Response(status=error.status, text=error.reason + "\n", headers=error.headers)


async def post_events(request: web.Request) -> web.Response:
    intake, settings = request.app[INTAKE], request.app[SETTINGS]
    event_type = load_registry().get(request.match_info["event_type"])
    labels = (event_type.name, event_type.tier.name) if event_type else (UNKNOWN_TYPE, "")
    started = time.monotonic()
    try:
        checks.check_header_bytes(request.raw_headers, settings.max_header_bytes)
        if event_type is None:
            raise Refused(404, "unknown event type", "unknown_type")
        checks.check_content_length(request.content_length, settings.max_body_bytes)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refused(413, f"body is larger than {settings.max_body_bytes} bytes", "body_too_large") from None
        events = checks.events_from_body(request.content_type, body, settings.max_event_bytes)
        messages = [stamp(event_type, *checks.split_event_id(event)) for event in events]
        await intake.accept(event_type, messages)
    except Refused as error:
        if error.label != "shed" and error.status != 507:
            intake.metrics.rejected.labels(*labels, error.label).inc()
        return refusal(error)
    finally:
        intake.metrics.latency.labels(*labels).observe(time.monotonic() - started)
    ids = [attributes["event_id"] for _, attributes in messages]
    return web.json_response({"ids": ids})


async def get_metrics(request: web.Request) -> web.Response:
    intake = request.app[INTAKE]
    intake.metrics.show_spill(await intake.on_spill(intake.spill.usage), time.time())
    return web.Response(body=intake.metrics.exposition(), content_type="text/plain", charset="utf-8")


def heartbeat_failures(settings: GatewaySettings, spill_fraction: float, disk_free_bytes: int) -> list[str]:
    """Why the gateway should get no more traffic, if it should not: a nearly full spill, a low disk."""
    failures = []
    if spill_fraction >= settings.heartbeat_spill_fraction:
        failures.append(f"spill is {spill_fraction:.0%} full")
    if disk_free_bytes < settings.min_free_disk_bytes:
        failures.append(f"spill disk has {disk_free_bytes} bytes free")
    return failures


async def get_heartbeat(request: web.Request) -> web.Response:
    """200 while the gateway can take events; 503 when its spill is nearly full or its disk low."""
    intake, settings = request.app[INTAKE], request.app[SETTINGS]
    spill_fraction = intake.spill_budget.fraction_used()
    free = shutil.disk_usage(settings.spill_dir).free
    failures = heartbeat_failures(settings, spill_fraction, free)
    body = {"ok": not failures, "failures": failures, "spill_fraction": spill_fraction, "disk_free_bytes": free}
    return web.Response(status=503 if failures else 200, text=json.dumps(body) + "\n", content_type="application/json")


async def _run_background(app: web.Application):
    """Flushes the spill and reports counts while the app runs; on shutdown drains what it can."""
    intake, settings = app[INTAKE], app[SETTINGS]
    tasks = [asyncio.create_task(flusher.flush_forever(intake)), asyncio.create_task(_report_counts(intake, settings))]
    yield
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    left = await flusher.drain(intake, settings.drain_seconds)
    for publisher in intake.publishers.values():
        await asyncio.to_thread(publisher.report_counts, True)
        await asyncio.to_thread(publisher.stop)
    intake.close()
    _LOG.info("gateway stopped; %d events left in the spill for the next start", left)


async def _report_counts(intake: Intake, settings: GatewaySettings) -> None:
    while True:
        await asyncio.sleep(settings.report_seconds)
        for publisher in intake.publishers.values():
            await asyncio.to_thread(publisher.report_counts)


def build_app(settings: GatewaySettings) -> web.Application:
    """The application, with one publisher per registered type and the spill opened (or reopened)."""
    registry = load_registry()
    publishers = {
        name: TypePublisher(settings.project, event_type, settings.max_in_flight, settings.window_seconds)
        for name, event_type in registry.items()
    }
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[INTAKE] = Intake(settings, publishers, Spill(settings.spill_path), GatewayMetrics())
    app.router.add_post("/v1/events/{event_type}", post_events)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/__heartbeat__", get_heartbeat)
    app.cleanup_ctx.append(_run_background)
    return app

"""The flusher: sends spilled events on to Pub/Sub, ``high`` tier first, and forgets them once acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from event_delivery.contract.registry import load_registry
from gateway.intake import Intake

BATCH = 500
PUBLISH_TIMEOUT_SECONDS = 10.0
IDLE_SECONDS = 1.0  # how long an empty or failing round waits before the next
_LOG = logging.getLogger(__name__)


async def flush_once(intake: Intake) -> tuple[int, int]:
    """Publishes one batch of the spill's first events; returns ``(acknowledged, tried)``."""
    events = await intake.on_spill(intake.spill.oldest, BATCH)
    registry = load_registry()
    known = [event for event in events if event.event_type in intake.publishers]
    futures = []
    for event in known:
        futures += intake.publish(registry[event.event_type], [(event.data, event.attributes)])
    safe = await intake.acknowledged(futures, PUBLISH_TIMEOUT_SECONDS)
    sent = [event for event, done in zip(known, safe, strict=True) if done]
    if sent:
        await intake.on_spill(intake.spill.remove, [event.seq for event in sent])
    for event in sent:
        tier = registry[event.event_type].tier.name
        intake.spill_budget.give_back(tier, event.size)
        intake.metrics.flushed.labels(event.event_type, tier).inc()
    return len(sent), len(events)


async def flush_forever(intake: Intake) -> None:
    """Flushes while the spill holds events; sleeps until something is spilled, or a failed round's pause."""
    while True:
        try:
            sent, tried = await flush_once(intake)
        except Exception:  # a bad round must not end the flusher: the events stay spilled
            _LOG.exception("flushing the spill failed; retrying")
            sent, tried = 0, 1
        if tried and sent == tried:
            continue
        intake.spilled.clear()
        if tried:
            await asyncio.sleep(IDLE_SECONDS)  # Pub/Sub refused some: give it a moment
        else:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(intake.spilled.wait(), IDLE_SECONDS)


async def drain(intake: Intake, seconds: float) -> int:
    """Flushes until the spill is empty, a round gets nothing through, or ``seconds`` pass; returns what is left."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sent, tried = await flush_once(intake)
        if not tried or not sent:
            break
    return sum(held.events for held in await intake.on_spill(intake.spill.usage))

"""Making accepted events safe: acknowledged by Pub/Sub in time, or durable in the spill.

``accept`` returns only once every event of a request is one or the other, and otherwise
raises ``Refused``: 503 with ``Retry-After`` when the type's tier has used its budget (``low``
first, then ``normal``), 507 when the spill itself is full. A request whose tier is out of
in-flight budget skips Pub/Sub and goes to the spill, so ``high`` keeps being accepted
while Pub/Sub is slow. An event that timed out may still reach Pub/Sub later, besides its
spilled copy: delivery deduplicates the two by ``event_id``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3

from event_delivery.contract.registry import EventType
from gateway.checks import Refused
from gateway.metrics import GatewayMetrics
from gateway.publishing import FlowControlLimitError, TypePublisher
from gateway.settings import GatewaySettings
from gateway.spill import Spill, event_size
from gateway.tiers import IN_FLIGHT_SHARES, SPILL_SHARES, Budget

Message = tuple[bytes, dict[str, str]]


class Intake:
    def __init__(
        self,
        settings: GatewaySettings,
        publishers: dict[str, TypePublisher],
        spill: Spill,
        metrics: GatewayMetrics,
    ):
        self.settings = settings
        self.publishers = publishers
        self.spill = spill
        self.metrics = metrics
        self.in_flight = Budget(settings.max_in_flight, IN_FLIGHT_SHARES)
        self.spill_budget = Budget(settings.spill_max_bytes, SPILL_SHARES)
        for held in spill.usage():  # what a previous run left in the spill
            self.spill_budget.take(held.tier, held.size)
        self.spilled = asyncio.Event()  # wakes the flusher
        # SQLite is used from this one thread only, so the event loop never waits on the disk.
        self._spill_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="spill")

    async def on_spill(self, method, *args):
        """Runs a ``Spill`` method on the spill's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._spill_thread, method, *args)

    async def accept(self, event_type: EventType, messages: list[Message]) -> None:
        tier = event_type.tier.name
        unsafe = messages
        if self.in_flight.try_take(tier, len(messages)):
            unsafe = await self._publish(event_type, messages)
        if unsafe:
            await self._spill(event_type, unsafe)
        self.metrics.accepted.labels(event_type.name, tier).inc(len(messages))

    def publish(self, event_type: EventType, messages: list[Message]) -> list[asyncio.Future | None]:
        """Hands each message to its type's publisher: its future, or None where flow control refused it."""
        publisher, futures = self.publishers[event_type.name], []
        for data, attributes in messages:
            try:
                futures.append(publisher.publish(data, attributes))
            except FlowControlLimitError:
                futures.append(None)
        return futures

    @staticmethod
    async def acknowledged(futures: list[asyncio.Future | None], timeout: float) -> list[bool]:
        """Whether Pub/Sub acknowledged each publish within ``timeout`` seconds."""
        pending = [future for future in futures if future is not None]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        return [future is not None and future.done() and future.exception() is None for future in futures]

    async def _publish(self, event_type: EventType, messages: list[Message]) -> list[Message]:
        """Publishes within the tier's in-flight budget (already taken); returns what is not yet safe.

        A publish holds its budget until Pub/Sub answers, also past the timeout: during an
        outage the budget runs out, and the lower tiers are shed at once instead of each
        request waiting for its timeout.
        """
        tier = event_type.tier.name
        futures = self.publish(event_type, messages)
        for future in futures:
            if future is None:
                self.in_flight.give_back(tier, 1)
            else:
                future.add_done_callback(lambda _: self.in_flight.give_back(tier, 1))
        safe = await self.acknowledged(futures, self.settings.publish_timeout_seconds)
        unsafe = [message for message, done in zip(messages, safe, strict=True) if not done]
        self.metrics.published.labels(event_type.name, tier).inc(len(messages) - len(unsafe))
        return unsafe

    async def _spill(self, event_type: EventType, messages: list[Message]) -> None:
        tier, name = event_type.tier.name, event_type.name
        size = sum(event_size(data, attributes) for data, attributes in messages)
        if not self.spill_budget.try_take(tier, size):
            self.metrics.shed.labels(name, tier).inc(len(messages))
            if self.spill_budget.used + size > self.spill_budget.capacity:
                raise Refused(507, "the spill is full; retry later", "spill_full", self._retry_after)
            raise Refused(503, f"Pub/Sub is slow and the {tier} tier is shed; retry later", "shed", self._retry_after)
        try:
            await self.on_spill(self.spill.add, tier, [(name, data, attributes) for data, attributes in messages])
        except sqlite3.Error as error:
            self.spill_budget.give_back(tier, size)
            self.metrics.shed.labels(name, tier).inc(len(messages))
            raise Refused(507, f"the spill cannot store events: {error}", "spill_error", self._retry_after) from None
        self.metrics.spilled.labels(name, tier).inc(len(messages))
        self.spilled.set()

    @property
    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_seconds)}

    def close(self) -> None:
        self._spill_thread.shutdown(wait=True)
        self.spill.close()

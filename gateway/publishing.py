"""One Pub/Sub publisher per type, whose publishes the event loop can await and never waits on.

Each type has its own client (its own batches and flow control), so one type's backlog
cannot hold up another's. Flow control raises ``FlowControlLimitError`` instead of
blocking the loop; the caller then spills or sheds. What Pub/Sub acknowledges is counted
per hour of ``received_at`` by the producer library's own counter, and reported to the
audit's counts topic as the producer reports it.
"""

from __future__ import annotations

import asyncio
import time

from google.cloud.pubsub_v1 import types
from google.cloud.pubsub_v1.publisher.exceptions import FlowControlLimitError

from event_delivery.cloud import clients
from event_delivery.contract import envelope
from event_delivery.contract.registry import EventType
from event_delivery.producer import EventPublisher

__all__ = ["FlowControlLimitError", "TypePublisher"]

FLOW_CONTROL_BYTES = 256 * 1024 * 1024
BATCH_LATENCY_SECONDS = 0.005


class TypePublisher:
    """Publishes one type's messages to its topic and counts the acknowledged ones for the audit."""

    def __init__(self, project: str, event_type: EventType, max_in_flight: int, window_seconds: int):
        flow_control = types.PublishFlowControl(
            message_limit=max_in_flight,
            byte_limit=FLOW_CONTROL_BYTES,
            limit_exceeded_behavior=types.LimitExceededBehavior.ERROR,
        )
        client = clients.publisher_client(
            publisher_options=types.PublisherOptions(flow_control=flow_control),
            batch_settings=types.BatchSettings(max_latency=BATCH_LATENCY_SECONDS),
        )
        self.event_type = event_type
        self.producer = EventPublisher(
            project, event_type, publisher=client, window_seconds=window_seconds, report_seconds=0
        )

    def publish(self, data: bytes, attributes: dict[str, str]) -> asyncio.Future:
        """Hands the message to the client; the future completes when Pub/Sub acknowledges it.

        Raises ``FlowControlLimitError`` at once when the type has too much in flight.
        """
        hour = self.producer.counts.hour_of(attributes, int(time.time() * 1000))
        future = asyncio.wrap_future(self.producer.client.publish(self.producer.topic, data, **attributes))

        def count_if_acknowledged(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                self.producer.counts.add(hour, attributes[envelope.EVENT_ID])

        future.add_done_callback(count_if_acknowledged)
        return future

    def report_counts(self, wait: bool = False) -> int:
        """Sends the audit's count reports (blocking when ``wait``: call it off the event loop)."""
        return self.producer.report_counts(wait=wait)

    def stop(self) -> None:
        """Sends what the client still batches and waits for it (blocking)."""
        self.producer.client.stop()

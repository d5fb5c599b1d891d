"""The demo's traffic through two doors: the gateway for what a client can send, Pub/Sub for the rest.

A client of the gateway sends fields and, if it likes, an ``event_id``; the gateway stamps
``received_at`` itself. So only a generated event that is expected to be delivered, and
carries nothing but the envelope attributes, goes through ``POST /v1/events/<type>``
(batches as NDJSON). What a gateway cannot produce is published straight to the topic, as
a misbehaving producer with its own Pub/Sub access would: malformed payloads and
attributes, events stamped in the past to be late, attributes of the producer's own, and
producer retries that repeat a message exactly, stamp included.

The ledger records every message as it reached its topic. The gateway answers with ids
only, so an event it accepted is recorded with the time its request was sent as
``received_at``; no request is sent within ``GUARD_SECONDS`` of an hour's end, so that
time and the gateway's own stamp fall in the same hour, which is all the jobs and the
audit look at. A retry of such an event repeats that recorded stamp, so it lands in the
original's hour and is a duplicate there.
"""

from __future__ import annotations

import dataclasses
import json
import time

from prometheus_client.parser import text_string_to_metric_families

from event_delivery.contract import envelope
from event_delivery.producer import EventPublisher
from tools.local.jobs import JobError
from tools.local.loadgen import DELIVERED, DUPLICATE, Ledger, Message

GUARD_SECONDS = 0.5
BATCH_EVENTS = 5
REFUSALS_TO_RETRY = 20


class GatewayRefused(JobError):
    """The gateway refused the demo's well-formed events for longer than a client retries."""


@dataclasses.dataclass
class GatewayCounts:
    """One type's events at the gateway: ``sent`` by the demo's own count, the rest from ``/metrics``."""

    sent: int = 0
    accepted: int = 0
    published: int = 0
    spilled: int = 0
    shed: int = 0
    rejected: int = 0


METRICS = {
    "gateway_events_accepted": "accepted",
    "gateway_events_published": "published",
    "gateway_events_spilled": "spilled",
    "gateway_events_shed": "shed",
    "gateway_requests_rejected": "rejected",  # summed over the reasons
}


def gateway_counts(exposition: str) -> dict[str, GatewayCounts]:
    """Each type's counts in the gateway's Prometheus text (tiers and reasons summed)."""
    by_type: dict[str, GatewayCounts] = {}
    for family in text_string_to_metric_families(exposition):
        field = METRICS.get(family.name)
        for sample in family.samples if field else ():
            if sample.name.endswith("_total"):
                counts = by_type.setdefault(sample.labels["event_type"], GatewayCounts())
                setattr(counts, field, getattr(counts, field) + int(sample.value))
    return by_type


def client_can_send(message: Message) -> bool:
    """Whether a gateway client could have sent this message: a well-formed, on-time, first event."""
    return message.expected == DELIVERED and sorted(message.attributes) == sorted(envelope.ENVELOPE_ATTRIBUTES)


class TwoDoors:
    """Sends one type's messages, each through the door that could have produced it, into a ledger."""

    def __init__(self, gateway, publisher: EventPublisher, window_seconds: int):
        self.gateway = gateway
        self.publisher = publisher
        self.window_seconds = window_seconds
        self.ledger = Ledger()
        self.sent_to_gateway = 0
        self.batch: list[Message] = []
        self.stamped: dict[str, dict] = {}  # the recorded attributes of each event the gateway accepted

    def send(self, message: Message) -> None:
        if client_can_send(message):
            self.batch.append(message)
            if len(self.batch) >= BATCH_EVENTS:
                self.flush_batch()
            return
        event_id = message.attributes.get(envelope.EVENT_ID)
        if message.expected == DUPLICATE and any(m.attributes[envelope.EVENT_ID] == event_id for m in self.batch):
            self.flush_batch()  # a retry comes after its original
        if message.expected == DUPLICATE and event_id in self.stamped:
            message = dataclasses.replace(message, attributes=self.stamped[event_id])
        self.publisher.publish_raw(message.data, message.attributes)
        self.ledger.record(message)

    def flush_batch(self) -> None:
        if not self.batch:
            return
        events = [{**json.loads(m.data), envelope.EVENT_ID: m.attributes[envelope.EVENT_ID]} for m in self.batch]
        sent_at = self._post(events)
        for message in self.batch:
            attributes = {**message.attributes, envelope.RECEIVED_AT: envelope.format_received_at(sent_at)}
            self.stamped[attributes[envelope.EVENT_ID]] = attributes
            self.ledger.record(dataclasses.replace(message, attributes=attributes))
        self.sent_to_gateway += len(self.batch)
        self.batch = []

    def _post(self, events: list[dict]) -> int:
        """Posts until the gateway accepts (a client retries a 503 or 507 with the same ids); the send time in ms."""
        event_type = self.publisher.event_type.name
        for _ in range(REFUSALS_TO_RETRY):
            self._wait_clear_of_hour_end()
            sent_at = int(time.time() * 1000)
            status, headers, body = self.gateway.post(event_type, events)
            if status == 200:
                ids = json.loads(body)["ids"]
                if ids != [event[envelope.EVENT_ID] for event in events]:
                    raise GatewayRefused(f"the gateway answered other ids than the {event_type} events sent: {ids}")
                return sent_at
            if status not in (503, 507):
                raise GatewayRefused(f"the gateway refused {event_type} events with {status}: {body.decode().strip()}")
            time.sleep(float(headers.get("Retry-After", 1)))
        raise GatewayRefused(f"the gateway refused {event_type} events {REFUSALS_TO_RETRY} times: {status}")

    def _wait_clear_of_hour_end(self) -> None:
        left = self.window_seconds - time.time() % self.window_seconds
        if left < GUARD_SECONDS:
            time.sleep(left + 0.01)

    def close(self) -> None:
        self.flush_batch()
        self.publisher.flush()


def send_traffic(doors: TwoDoors, messages, rate: float) -> TwoDoors:
    """Sends at most ``rate`` messages per second, as ``loadgen.publish_traffic`` publishes them."""
    started = time.monotonic()
    for handled, message in enumerate(messages, start=1):
        doors.send(message)
        ahead = handled / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
    doors.close()
    return doors

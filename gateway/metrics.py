"""The gateway's Prometheus metrics, per type and tier, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.spill import Usage

LABELS = ("event_type", "tier")
# A request for an unknown type is counted under this name, never under the name it asked for:
# a label a client chooses would let it grow the metrics without bound.
UNKNOWN_TYPE = "unknown"


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()

        def counter(name: str, doc: str, labels=LABELS) -> Counter:
            return Counter(name, doc, labels, registry=self.registry)

        self.accepted = counter("gateway_events_accepted", "Events answered 200 (published or spilled).")
        self.published = counter("gateway_events_published", "Events Pub/Sub acknowledged within the timeout.")
        self.spilled = counter("gateway_events_spilled", "Events written to the spill.")
        self.flushed = counter("gateway_events_flushed", "Spilled events the flusher published.")
        self.shed = counter("gateway_events_shed", "Events refused with 503 (tier budget) or 507 (spill full).")
        self.rejected = counter(
            "gateway_requests_rejected", "Requests refused at the door, by reason.", (*LABELS, "reason")
        )
        self.spill_bytes = Gauge("gateway_spill_bytes", "Bytes in the spill.", LABELS, registry=self.registry)
        self.spill_events = Gauge("gateway_spill_events", "Events in the spill.", LABELS, registry=self.registry)
        self.spill_age = Gauge(
            "gateway_spill_oldest_age_seconds", "Age of the oldest spilled event.", LABELS, registry=self.registry
        )
        self.latency = Histogram(
            "gateway_request_seconds", "Time to answer a request for events.", LABELS, registry=self.registry
        )

    def show_spill(self, usage: list[Usage], now: float) -> None:
        """Sets the spill gauges to ``usage``; a (type, tier) no longer in it reads 0."""
        for gauge in (self.spill_bytes, self.spill_events, self.spill_age):
            gauge.clear()
        for held in usage:
            labels = (held.event_type, held.tier)
            self.spill_bytes.labels(*labels).set(held.size)
            self.spill_events.labels(*labels).set(held.events)
            self.spill_age.labels(*labels).set(max(0.0, now - held.oldest_spilled_at))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

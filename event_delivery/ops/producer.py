"""Publish events in the input contract's form: JSON data plus the envelope attributes.

As a library::

    publisher = EventPublisher("local-project", get_event_type("play"))
    publisher.publish({"user_id": "u1", ...})
    publisher.flush()

As a command, one JSON object per line on stdin::

    echo '{"service": "login", ...}' | \\
        python -m event_delivery.ops.producer --project local-project --event_type service_log
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

from event_delivery.cloud import clients, preflight
from event_delivery.contract import envelope
from event_delivery.contract.registry import EventType, load_registry


def attributes_for(event_type: EventType, event_id: str, received_at_millis: int) -> dict[str, str]:
    return {
        envelope.EVENT_ID: event_id,
        envelope.RECEIVED_AT: envelope.format_received_at(received_at_millis),
        envelope.EVENT_TYPE: event_type.name,
    }


class EventPublisher:
    """Publishes one type's events to its topic, batching like any Pub/Sub client."""

    def __init__(self, project: str, event_type: EventType, publisher=None):
        self.event_type = event_type
        self.client = publisher or clients.publisher_client()
        self.topic = self.client.topic_path(project, event_type.topic)
        self.pending = []

    def publish(self, fields: dict, event_id: str | None = None, received_at_millis: int | None = None) -> str:
        """Publishes an event, stamping ``received_at`` now unless given; returns its id.

        A retry must reuse the returned ``event_id``: that is how delivery deduplicates.
        """
        event_id = event_id or str(uuid.uuid4())
        received_at_millis = int(time.time() * 1000) if received_at_millis is None else received_at_millis
        data = json.dumps(fields, separators=(",", ":")).encode("utf-8")
        self.publish_raw(data, attributes_for(self.event_type, event_id, received_at_millis))
        return event_id

    def publish_raw(self, data: bytes, attributes: dict[str, str]) -> None:
        """Publishes exactly these bytes and attributes (the load generator's malformed input)."""
        self.pending.append(self.client.publish(self.topic, data, **attributes))

    def flush(self) -> int:
        """Waits until everything published so far is accepted; returns how many were."""
        done = len(self.pending)
        for future in self.pending:
            future.result(timeout=60)
        self.pending.clear()
        return done


def main(argv=None) -> int:
    registry = load_registry()
    parser = argparse.ArgumentParser(prog="python -m event_delivery.ops.producer", description=__doc__.split("\n")[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--event_type", required=True, choices=sorted(registry))
    args = parser.parse_args(argv)
    with preflight.exit_on_failure(parser.prog):
        preflight.check_topic(f"projects/{args.project}/topics/{registry[args.event_type].topic}")
    publisher = EventPublisher(args.project, registry[args.event_type])
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as error:
            print(f"error: line {number} is not JSON: {error.msg}", file=sys.stderr)
            return 2
        print(publisher.publish(fields))
    publisher.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The entry point: an HTTP gateway that publishes each event to its type's Pub/Sub topic.

``POST /v1/events/<type>`` takes a JSON object or NDJSON, checks only the envelope (the
jobs check the schema), stamps ``received_at`` and a missing ``event_id`` as the producer
library does, and answers 200 with the ids only once each event is safe: acknowledged by
Pub/Sub, or durable in a local SQLite spill that a flusher sends on, ``high`` tier first.
Under pressure ``low`` and then ``normal`` are shed with 503 while ``high`` is spilled.

Run it with ``python -m gateway --project P --port N --spill_dir D`` (``make gateway``);
``docs/gateway.md`` describes the routes, statuses, metrics and deployment.
"""

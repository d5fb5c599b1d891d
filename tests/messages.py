"""Messages as the producer sends them, and as parsing refuses them: builders for tests."""

from __future__ import annotations

import datetime
import json

from apache_beam.io.gcp.pubsub import PubsubMessage

from event_delivery.contract import envelope
from event_delivery.contract.samples import fake_fields
from transforms.records import RecordCoder, encoded_event, event_record


def message(fields: dict | None = None, event_id: str | None = "e-1", received_at_millis=None, **attributes):
    """A Pub/Sub message as the producer sends it, with ``fields`` as its JSON payload."""
    data = json.dumps(fields if fields is not None else {}).encode()
    attrs = {}
    if event_id is not None:
        attrs[envelope.EVENT_ID] = event_id
    if received_at_millis is not None:
        attrs[envelope.RECEIVED_AT] = str(received_at_millis)
    attrs.update(attributes)
    return PubsubMessage(data, attrs)


def published_at(message: PubsubMessage, millis: float) -> PubsubMessage:
    """The message as Pub/Sub delivers it, with its publish time."""
    moment = datetime.datetime.fromtimestamp(millis / 1000, tz=datetime.timezone.utc)
    return PubsubMessage(message.data, message.attributes, publish_time=moment)


def raw_message(data: bytes, event_id: str | None = "e-1", **attributes):
    """A message with exactly these bytes as its payload."""
    if event_id is not None:
        attributes[envelope.EVENT_ID] = event_id
    return PubsubMessage(data, attributes)


def valid_fields(event_type, seed: int = 0) -> dict:
    import random

    return fake_fields(event_type, random.Random(seed), 100)


def forgotten_event(event_type, event_id: str, received_at_millis: int, seed: int = 0) -> tuple:
    """A valid event of a forgotten subject as sealing gives it: encoded, its personal fields null."""
    fields = {**valid_fields(event_type, seed), **dict.fromkeys(event_type.personal_fields)}
    record = event_record((event_id, received_at_millis, fields))
    return encoded_event(
        event_id, received_at_millis, RecordCoder(event_type.parsed_delivered_schema).encode(record), True
    )


def malformed_messages(event_type, fields: dict, event_id: str, max_event_bytes: int, **attributes) -> list:
    """One message for each way parsing refuses one, each built from ``fields`` (so it carries their
    values, the subject's included), with ids ``<event_id>-<kind>`` (none for the missing id)."""
    text, subject = json.dumps(fields), event_type.subject_field
    kinds = {
        "unknown_field": (json.dumps({**fields, "new_field": 1}), {}),
        "wrong_type": (json.dumps({**fields, subject: [fields[subject]]}), {}),
        "not_json": (text[:-1], {}),
        "not_object": (json.dumps([fields]), {}),
        "not_utf8": ("\udcff" + text, {}),
        "too_large": (text + " " * max_event_bytes, {}),
        "type_mismatch": (text, {envelope.EVENT_TYPE: f"not-{event_type.name}"}),
        "bad_timestamp": (text, {envelope.RECEIVED_AT: "yesterday"}),
        "missing_id": (text, {envelope.EVENT_ID: ""}),
    }
    return [
        PubsubMessage(
            data.encode("utf-8", "surrogateescape"), {envelope.EVENT_ID: f"{event_id}-{kind}", **attributes, **more}
        )
        for kind, (data, more) in kinds.items()
    ]

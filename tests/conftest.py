"""Shared fixtures: the real emulators for I/O tests, and small builders for messages."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import uuid

import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from hypothesis import settings

from event_delivery.cloud import clients
from event_delivery.contract import envelope
from event_delivery.contract.registry import load_registry
from event_delivery.contract.samples import fake_fields
from tools.local.emulators import bigtable_command, free_port, running_emulators, start, stop_process_group

PROJECT = "local-project"

# Hypothesis fails any example slower than 200 ms by default. On a loaded 2-core CI runner a
# slow example is no bug, so no generated test has a deadline (set before any test module
# builds its own settings, which inherit this profile).
settings.register_profile("no_deadline", deadline=None)
settings.load_profile("no_deadline")


@pytest.fixture(scope="session")
def emulators(tmp_path_factory):
    """Pub/Sub and GCS emulators for the whole session; ``os.environ`` points at them."""
    with running_emulators(tmp_path_factory.mktemp("emulators")) as env:
        clients.use_emulator_credentials()
        yield env


@pytest.fixture(scope="module")
def bigtable_emulator(tmp_path_factory):
    """A Bigtable emulator for one test module; ``BIGTABLE_EMULATOR_HOST`` points at it meanwhile."""
    port = free_port()
    emulator = start(
        "Bigtable",
        bigtable_command(port),
        clients.BIGTABLE_EMULATOR_HOST,
        port,
        tmp_path_factory.mktemp("bigtable") / "bigtable.log",
    )
    previous = os.environ.get(clients.BIGTABLE_EMULATOR_HOST)
    os.environ[clients.BIGTABLE_EMULATOR_HOST] = emulator.address
    yield emulator.address
    stop_process_group(emulator.process.pid)
    if previous is None:
        del os.environ[clients.BIGTABLE_EMULATOR_HOST]
    else:
        os.environ[clients.BIGTABLE_EMULATOR_HOST] = previous


@pytest.fixture
def bucket(emulators):
    """A fresh bucket on the GCS emulator."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    clients.storage_client(PROJECT).create_bucket(name)
    return name


def drop_subscriptions_of(project: str, event_types) -> None:
    """Deletes the types' delivery and audit subscriptions, with all that other tests published
    to them; provisioning makes them anew, empty."""
    from google.api_core import exceptions

    from tools.ops import provision

    subscriber = clients.subscriber_client()
    for event_type in event_types:
        delivery = subscriber.subscription_path(project, event_type.subscription)
        audit_source = provision.audit_subscription(project, event_type)[0]
        for name in (delivery, audit_source):
            with contextlib.suppress(exceptions.NotFound):
                subscriber.delete_subscription(subscription=name)


@pytest.fixture(scope="session")
def registry():
    return load_registry()


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

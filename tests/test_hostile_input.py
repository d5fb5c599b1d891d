"""Generated hostile input: no payload or attribute map crashes parsing, and every message
comes out exactly once, as a valid event or as a dead letter with a kind."""

from __future__ import annotations

import io
import json

import fastavro
from apache_beam.io.gcp.pubsub import PubsubMessage
from fastavro.validation import validate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from event_delivery.contract.dead_letters import ErrorKind, parsed_dead_letter_schema
from event_delivery.contract.registry import load_registry
from tests.conftest import published_at
from transforms.parse import DEAD_LETTERS, ParseEventFn

ARRIVAL_MILLIS = 1_800_000_000_000
TYPES = sorted(load_registry())
# Pub/Sub attributes are UTF-8 on the wire, so they never hold lone surrogates.
wire_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
attribute_maps = st.dictionaries(
    st.sampled_from(["event_id", "received_at", "event_type", "other"]) | wire_text, wire_text, max_size=5
)
json_leaves = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
timestamps = st.one_of(
    st.integers(min_value=-(10**15), max_value=10**15).map(str),
    st.datetimes(timezones=st.just(__import__("datetime").timezone.utc)).map(lambda d: d.isoformat()),
    wire_text,
)


def parse_once(type_name, data, attributes, max_bytes=4096):
    fn = ParseEventFn(load_registry()[type_name], max_bytes, late_horizon_seconds=7 * 86400, max_future_seconds=3600)
    fn.setup()
    outputs = list(fn.process(published_at(PubsubMessage(data, attributes), ARRIVAL_MILLIS)))
    assert len(outputs) == 1, "every message comes out exactly once"
    return outputs[0]


def check(type_name, output):
    event_type = load_registry()[type_name]
    if getattr(output, "tag", None) == DEAD_LETTERS:
        _, received_at, record = output.value
        assert record["error_kind"] in ErrorKind.__members__
        fastavro.writer(io.BytesIO(), parsed_dead_letter_schema(), [{**record, "received_at": received_at}])
        return "dead_letter"
    event_id, received_at, record = output
    assert event_id and received_at >= 0
    assert validate(record, event_type.parsed_payload_schema, raise_errors=False)
    fastavro.writer(
        io.BytesIO(), event_type.parsed_clear_schema, [{"event_id": event_id, "received_at": received_at, **record}]
    )
    return "event"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(type_name=st.sampled_from(TYPES), data=st.binary(max_size=200), attributes=attribute_maps)
def test_arbitrary_bytes_and_attributes(type_name, data, attributes):
    check(type_name, parse_once(type_name, data, attributes))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(type_name=st.sampled_from(TYPES), data=st.data(), received_at=timestamps)
def test_near_miss_events(type_name, data, received_at):
    """Valid events with one field changed, dropped or added; odd timestamps."""
    from tests.conftest import valid_fields

    event_type = load_registry()[type_name]
    fields = valid_fields(event_type, data.draw(st.integers(0, 1000)))
    mutation = data.draw(st.sampled_from(["replace", "drop", "add", "none"]))
    name = data.draw(st.sampled_from(list(fields)))
    if mutation == "replace":
        fields[name] = data.draw(json_values)
    elif mutation == "drop":
        del fields[name]
    elif mutation == "add":
        fields[data.draw(st.text(max_size=10))] = data.draw(json_values)
    payload = json.dumps(fields, allow_nan=True).encode("utf-8", "surrogatepass")
    attributes = {"event_id": "e-1", "received_at": received_at}
    outcome = check(type_name, parse_once(type_name, payload, attributes))
    if mutation == "none" and outcome == "dead_letter":
        output = parse_once(type_name, payload, attributes)
        assert output.value[2]["error_kind"] == "BAD_TIMESTAMP"


@settings(max_examples=100)
@given(depth=st.integers(1, 100_000), opener=st.sampled_from(["[", '{"a":']))
def test_deep_nesting_is_refused_not_crashed(depth, opener):
    closer = "]" if opener == "[" else "}"
    payload = (opener * depth + "1" + closer * depth).encode()
    output = parse_once("service_log", payload, {"event_id": "e-1"}, max_bytes=2**20)
    assert check("service_log", output) == "dead_letter"

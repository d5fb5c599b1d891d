"""The checks compiled from a schema say what fastavro's validation says, for every JSON value."""

from __future__ import annotations

import copy
import json
import pathlib

import fastavro
from fastavro.validation import validate
from hypothesis import given, settings
from hypothesis import strategies as st

from event_delivery.contract.registry import event_type_from_schema, load_registry
from transforms.field_checks import compile_fields

REGISTRY = load_registry()
# Every type a compiled field can have, with values at and past its edges.
SCHEMA = fastavro.parse_schema(
    {
        "type": "record",
        "name": "Everything",
        "fields": [
            {"name": "null", "type": "null"},
            {"name": "boolean", "type": "boolean"},
            {"name": "int", "type": "int"},
            {"name": "long", "type": "long"},
            {"name": "float", "type": "float"},
            {"name": "double", "type": "double"},
            {"name": "string", "type": "string"},
            {"name": "bytes", "type": "bytes"},
            {"name": "enum", "type": {"type": "enum", "name": "E", "symbols": ["A", "B"]}},
            {"name": "nullable", "type": ["null", "long"]},
            {"name": "either", "type": ["int", "string", "boolean"]},
            {"name": "typed", "type": {"type": "int"}},
        ],
    }
)
edges = st.sampled_from(
    [0, 1, -1, True, False, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1]
    + [0.0, -0.0, 1.5, float("nan"), float("inf"), 1e308, "A", "B", "a", "", "AB", None, [], {}, ["A"], {"A": 1}]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | edges,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _compiled_verdict(schema, record) -> bool:
    return all(check(record[name]) for name, check in compile_fields(schema))


@settings(max_examples=500)
@given(values=st.fixed_dictionaries({f["name"]: json_values for f in SCHEMA["fields"]}))
def test_each_compiled_type_says_what_fastavro_says(values):
    for field in SCHEMA["fields"]:  # one field at a time, the others valid, so each verdict is that field's
        record = {**_valid(), field["name"]: values[field["name"]]}
        assert _compiled_verdict(SCHEMA, record) == validate(record, SCHEMA, raise_errors=False), field["name"]


def _valid() -> dict:
    return {
        "null": None,
        "boolean": True,
        "int": 1,
        "long": 1,
        "float": 1.0,
        "double": 1,
        "string": "s",
        "bytes": b"",
        "enum": "A",
        "nullable": None,
        "either": "x",
        "typed": 2,
    }


@settings(max_examples=300)
@given(data=st.data())
def test_every_registered_type_is_compiled_and_agrees_with_fastavro(data):
    event_type = REGISTRY[data.draw(st.sampled_from(sorted(REGISTRY)))]
    schema = event_type.parsed_payload_schema
    assert compile_fields(schema) is not None, f"{event_type.name}: its fields are all of compiled types"
    record = {f["name"]: data.draw(json_values) for f in schema["fields"]}
    assert _compiled_verdict(schema, record) == validate(record, schema, raise_errors=False)


def test_a_schema_with_a_type_not_compiled_is_left_to_fastavro():
    nested = json.loads((pathlib.Path(__file__).parents[1] / "schemas" / "listening_session.avsc").read_text())
    event_type = event_type_from_schema(copy.deepcopy(nested), "listening_session")
    assert compile_fields(event_type.parsed_payload_schema) is None
    for logical in ({"type": "long", "logicalType": "timestamp-millis"}, {"type": "array", "items": "int"}):
        schema = fastavro.parse_schema({"type": "record", "name": "R", "fields": [{"name": "f", "type": logical}]})
        assert compile_fields(schema) is None

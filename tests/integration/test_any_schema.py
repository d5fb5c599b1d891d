"""Any schema the registry accepts can be generated and delivered; what JSON cannot carry is refused.

The type under test lives in tests/schemas: nested records, arrays, maps, nullable and
multi-branch unions, a named type used twice, logical types, and a personal record.
"""

from __future__ import annotations

import copy
import json
import pathlib
import random

import pytest

from event_delivery.cloud import files
from event_delivery.contract.compatibility import check_backward_compatible
from event_delivery.contract.registry import RegistryError, event_type_from_schema
from event_delivery.contract.samples import fake_fields
from tests.integration.test_gdpr import decrypted, deliver_events
from tests.streams import local_keys, local_settings
from tools.local.loadgen import DELIVERED, TrafficMix, traffic

SCHEMA = json.loads((pathlib.Path(__file__).parents[1] / "schemas" / "listening_session.avsc").read_text())


@pytest.fixture
def session_type():
    return event_type_from_schema(copy.deepcopy(SCHEMA), "listening_session")


def test_generated_events_of_a_nested_type_are_delivered_and_decrypt_to_the_original(tmp_path, session_type):
    originals = {f"e{i}": fake_fields(session_type, random.Random(i), 10) for i in range(20)}
    assert any(o["home"] for o in originals.values()) and any(o["tracks"] for o in originals.values())
    keys = local_keys(tmp_path)
    deliver_events(local_settings(tmp_path / "out", session_type, keys), list(originals.items()))

    assert not files.glob(f"{tmp_path}/out/dead-letter/**/*.avro"), "every generated event is valid"
    delivered = [
        r for p in files.glob(f"{tmp_path}/out/delivered/listening_session/*/*/*.avro") for r in files.read_avro(p)
    ]
    assert sorted(r["event_id"] for r in delivered) == sorted(originals)
    assert all(r["home"] is None or isinstance(r["home"], bytes) for r in delivered), "the personal record is sealed"
    clear = decrypted(tmp_path, session_type, keys)
    for event_id, fields in originals.items():
        assert clear[event_id]["home"] == fields["home"]
        assert [t["track_id"] for t in clear[event_id]["tracks"]] == [t["track_id"] for t in fields["tracks"]]
        assert clear[event_id]["counters"] == fields["counters"]


def test_the_load_generator_and_the_compatibility_check_take_a_nested_type(session_type):
    messages = list(traffic(session_type, 200, TrafficMix(duplicates=0, malformed=0.1, late=0), random.Random(3)))
    assert sum(m.expected == DELIVERED for m in messages) > 150
    check_backward_compatible(session_type, session_type)


@pytest.mark.parametrize(
    "field_type, what",
    [
        ("bytes", "bytes"),
        (["null", "bytes"], "bytes"),
        ({"type": "fixed", "name": "Hash", "size": 16}, "fixed"),
        ({"type": "array", "items": "bytes"}, "bytes"),
        ({"type": "map", "values": {"type": "bytes", "logicalType": "decimal", "precision": 9, "scale": 2}}, "bytes"),
        ({"type": "record", "name": "Blob", "fields": [{"name": "raw", "type": "bytes"}]}, "bytes"),
    ],
)
def test_the_registry_refuses_what_json_cannot_carry_with_a_one_line_reason(field_type, what):
    schema = copy.deepcopy(SCHEMA)
    schema["fields"].append({"name": "blob", "type": field_type})
    with pytest.raises(RegistryError) as refused:
        event_type_from_schema(schema, "listening_session")
    message = str(refused.value)
    assert "\n" not in message
    assert message == f"listening_session.avsc: field 'blob' holds Avro {what}, which a JSON payload cannot carry"

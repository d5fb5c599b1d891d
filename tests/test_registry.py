"""The schema registry: its rules, the shipped types, and backward-compatible evolution."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess

import fastavro
import pytest

from event_delivery.contract.compatibility import IncompatibleSchema, check_backward_compatible
from event_delivery.contract.registry import ENVELOPE_FIELDS, RegistryError, event_type_from_schema

SCHEMAS = pathlib.Path(__file__).parent.parent / "avro_schemas"


def test_ships_the_types_the_contract_asks_for(registry):
    assert len(registry) >= 6
    assert any(t.tier.name == "high" for t in registry.values())
    assert any(t.subject_field is None for t in registry.values()), "an operational log has no subject"
    assert sum(bool(t.personal_fields) for t in registry.values()) >= 3


def test_every_schema_file_is_a_registered_type(registry):
    assert sorted(p.stem for p in SCHEMAS.glob("*.avsc")) == sorted(registry)


def test_names_derive_from_the_type(registry):
    for name, event_type in registry.items():
        assert event_type.topic == f"events-{name}"
        assert event_type.subscription == f"events-{name}-delivery"


def test_subject_field_is_personal(registry):
    for event_type in registry.values():
        if event_type.subject_field:
            assert event_type.subject_field in event_type.personal_fields


def test_delivered_schema_is_envelope_key_id_then_fields_with_personal_ones_encrypted(registry):
    envelope = [f["name"] for f in ENVELOPE_FIELDS]
    for event_type in registry.values():
        schema = event_type.delivered_schema
        fields = {f["name"]: f for f in schema["fields"]}
        key_id = ["key_id"] if event_type.subject_field else []
        assert list(fields) == envelope + key_id + list(event_type.field_names)
        for name in event_type.personal_fields:
            assert fields[name]["type"] == ["null", "bytes"]
        for field in event_type.schema["fields"]:
            if field["name"] not in event_type.personal_fields:
                assert fields[field["name"]]["type"] == field["type"]
        assert not any("personal" in field for field in schema["fields"])
        fastavro.parse_schema(schema)


def test_clear_schema_keeps_types_and_makes_personal_fields_nullable(registry):
    for event_type in registry.values():
        fields = {f["name"]: f for f in event_type.clear_schema["fields"]}
        assert "key_id" not in fields
        for field in event_type.schema["fields"]:
            clear = fields[field["name"]]["type"]
            if field["name"] in event_type.personal_fields:
                assert "null" in clear
            else:
                assert clear == field["type"]


def _schema(**changes):
    schema = json.loads((SCHEMAS / "play.avsc").read_text())
    schema.update(changes)
    return schema


@pytest.mark.parametrize(
    "changes, complaint",
    [
        ({"tier": "urgent"}, "tier"),
        ({"event_type": None}, "event_type"),
        ({"event_type": "Play"}, "lower_snake_case"),
        ({"subject_field": "track_id"}, "must be marked personal"),
        ({"subject_field": "nope"}, "is not a field"),
    ],
)
def test_rejects_schemas_that_break_the_rules(changes, complaint):
    with pytest.raises(RegistryError, match=complaint):
        event_type_from_schema(_schema(**changes))


def test_rejects_personal_fields_without_a_subject():
    schema = _schema()
    del schema["subject_field"]
    with pytest.raises(RegistryError, match="subject_field"):
        event_type_from_schema(schema)


def test_rejects_envelope_field_names():
    schema = _schema()
    schema["fields"].append({"name": "event_id", "type": "string"})
    with pytest.raises(RegistryError, match="reserved"):
        event_type_from_schema(schema)


@pytest.mark.parametrize("name", ["raw", "payload", "attributes"])
def test_rejects_the_field_names_sealing_binds(name, registry):
    """A type's field ``raw`` would be sealed under the subject's key with the same associated data
    as an archived payload of the type, so the one ciphertext could be passed off as the other."""
    schema = _schema()
    schema["fields"].append({"name": name, "type": "string"})
    with pytest.raises(RegistryError, match=f"{name!r} is reserved: sealing binds"):
        event_type_from_schema(schema)
    assert all(name not in event_type.field_names for event_type in registry.values())


def test_file_name_must_match_type():
    with pytest.raises(RegistryError, match="match the file name"):
        event_type_from_schema(_schema(), "plays")


def test_adding_a_field_with_a_default_is_compatible():
    old = event_type_from_schema(_schema())
    new_schema = _schema()
    new_schema["fields"].append({"name": "offline", "type": "boolean", "default": False})
    check_backward_compatible(old, event_type_from_schema(new_schema))


@pytest.mark.parametrize(
    "evolve",
    [
        lambda fields: fields.append({"name": "offline", "type": "boolean"}),  # no default
        lambda fields: fields[3].update(type="string"),  # ms_played: long -> string
        lambda fields: fields[2]["type"].update(symbols=["ALBUM"]),  # enum loses symbols, no default
    ],
)
def test_incompatible_changes_are_caught(evolve):
    old = event_type_from_schema(_schema())
    new_schema = copy.deepcopy(_schema())
    evolve(new_schema["fields"])
    new_schema["fields"][2].pop("default", None)
    with pytest.raises(IncompatibleSchema):
        check_backward_compatible(old, event_type_from_schema(new_schema))


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=SCHEMAS.parent, capture_output=True, text=True, check=True).stdout


def _previous_version(path: pathlib.Path) -> str | None:
    """The schema as it was before its latest change (committed or not), if it has a history."""
    relative = path.relative_to(SCHEMAS.parent).as_posix()
    if _git("status", "--porcelain", "--", relative).strip():
        revisions = ["HEAD"]
    else:
        revisions = _git("log", "--format=%H", "-n", "2", "--", relative).split()[1:]
    for revision in revisions:
        try:
            return _git("show", f"{revision}:{relative}")
        except subprocess.CalledProcessError:
            return None  # the file is new
    return None


def test_every_schema_reads_data_of_its_previous_version(registry):
    try:
        _git("rev-parse", "HEAD")
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("not a git checkout with history")
    if _git("rev-parse", "--is-shallow-repository").strip() == "true":
        reason = "a shallow clone holds no earlier schema versions to check against: run `git fetch --unshallow`"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI's gate must never pass by checking nothing
        pytest.skip(reason)
    checked = 0
    for path in sorted(SCHEMAS.glob("*.avsc")):
        previous = _previous_version(path)
        if previous is None:
            continue
        check_backward_compatible(event_type_from_schema(json.loads(previous)), registry[path.stem])
        checked += 1
    print(f"checked {checked} schema(s) against their previous version")

"""The schema registry: its rules, the shipped types, and backward-compatible evolution."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import subprocess

import fastavro
import pytest

from event_delivery.contract.compatibility import IncompatibleSchema, check_backward_compatible
from event_delivery.contract.registry import ENVELOPE_FIELDS, RegistryError, event_type_from_schema

SCHEMAS = pathlib.Path(__file__).parents[2] / "avro_schemas"
PRIVACY_DOC = SCHEMAS.parent / "docs" / "privacy.md"

# Words that, in a field's name, mark a quasi-identifier: a value that can single a person out
# or link their events, alone or combined with others. Such a field is personal wherever its
# type has a subject to seal it under.
QUASI_IDENTIFIER_WORDS = frozenset(
    {
        *("session", "cookie", "token"),  # link the events of one visit or browser
        *("ip", "mac", "host", "address"),  # network and postal addresses
        *("device", "imei", "idfa", "agent", "fingerprint"),  # a device, or what tells it apart
        *("lat", "latitude", "lon", "lng", "longitude", "gps", "location", "postcode", "zip"),  # places
        *("email", "phone", "name", "username", "birth", "birthday"),  # contact and identity
        *("query", "message", "text", "comment", "title", "description", "bio"),  # free text
        *("referrer", "referer", "url", "uri"),  # URLs carry ids and tokens
        *("playlist",),  # a user's own playlist resolves publicly to its owner
    }
)

# The fields that match a word above and stay in clear, each with its reason. A type without
# a subject cannot seal anything (see docs/privacy.md, "What stays in clear, and why").
CLEAR_QUASI_IDENTIFIERS = {
    ("service_log", "host"): "a backend machine's name, never a client's: it names no person",
    ("service_log", "message"): "no subject to seal it under; the contract restricts it to the service's own text",
}


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


def _words(name: str) -> set[str]:
    """The words of a field name: ``ip_address`` and ``ipAddress`` both give {"ip", "address"}."""
    return set(re.split(r"[^a-z0-9]+", re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower())) - {""}


def _names_within(field: dict):
    """A field's name, and the names of the fields of any record it holds."""
    yield field["name"]
    pending = [field["type"]]
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            for nested in node.get("fields", ()):
                yield nested["name"]
                pending.append(nested["type"])
            pending.extend(node[key] for key in ("items", "values") if key in node)


def test_quasi_identifier_words_are_whole_words_at_any_depth():
    assert _words("clientIpAddress") == _words("client_ip_address") == {"client", "ip", "address"}
    assert not _words("latency_ms") & QUASI_IDENTIFIER_WORDS, "a word, not a prefix: latency is no latitude"
    contact = {"type": "record", "name": "Contact", "fields": [{"name": "email", "type": "string"}]}
    assert list(_names_within({"name": "contact", "type": ["null", contact]})) == ["contact", "email"]


def test_no_quasi_identifier_stays_in_clear_without_a_reason(registry):
    """A field named like a session, address, device, place, contact or free text is personal
    (or holds one, nested), unless it is allowed in clear above with the reason."""
    in_clear = [
        f"{name}.{field['name']}"
        for name, event_type in registry.items()
        for field in event_type.schema["fields"]
        if field["name"] not in event_type.personal_fields
        and (name, field["name"]) not in CLEAR_QUASI_IDENTIFIERS
        and any(_words(inner) & QUASI_IDENTIFIER_WORDS for inner in _names_within(field))
    ]
    assert not in_clear, f"quasi-identifiers in clear: mark them personal, or allow them with the reason: {in_clear}"


def test_every_quasi_identifier_allowed_in_clear_is_a_clear_field(registry):
    """The allowance names fields that exist and are in clear, so it never outlives its reason."""
    for (name, field), reason in CLEAR_QUASI_IDENTIFIERS.items():
        assert reason and field in registry[name].field_names
        assert field not in registry[name].personal_fields


def _documented_classification(type_name: str) -> dict[str, str]:
    """``{field: "personal" | "clear"}`` from the type's table in docs/privacy.md."""
    text = PRIVACY_DOC.read_text(encoding="utf-8").split("### What stays in clear, and why", 1)[1]
    table = text.split(f"#### `{type_name}`", 1)[1].split("\n#", 1)[0]
    return dict(re.findall(r"^\| `(\w+)` \| \**(personal|clear)\** \|", table, flags=re.MULTILINE))


def test_privacy_doc_lists_every_field_as_the_registry_classifies_it(registry):
    for name, event_type in registry.items():
        expected = {f: "personal" if f in event_type.personal_fields else "clear" for f in event_type.field_names}
        assert _documented_classification(name) == expected, name


def test_marking_an_existing_field_personal_is_compatible():
    """Sealing a field changes only how it is delivered; its clear form becomes nullable (a forgotten
    subject's value decrypts to null), and a nullable reader reads every value written before."""
    old = event_type_from_schema(_schema())
    new_schema = _schema()
    [country] = [f for f in new_schema["fields"] if f["name"] == "country"]
    country["personal"] = True
    check_backward_compatible(old, event_type_from_schema(new_schema))


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
    checked = []
    for path in sorted(SCHEMAS.glob("*.avsc")):
        previous = _previous_version(path)
        if previous is None:
            continue
        check_backward_compatible(event_type_from_schema(json.loads(previous)), registry[path.stem])
        checked.append(path.stem)
    print(f"checked {len(checked)} schema(s) against their previous version")
    # A gate that checks nothing passes everything: every schema git holds an earlier version of is checked.
    assert checked == [path.stem for path in sorted(SCHEMAS.glob("*.avsc")) if _versions(path) > 1]


def _versions(path: pathlib.Path) -> int:
    """How many versions of the file git knows: its commits, and one more if it is changed or new."""
    relative = path.relative_to(SCHEMAS.parent).as_posix()
    commits = int(_git("rev-list", "--count", "HEAD", "--", relative))
    return commits + bool(_git("status", "--porcelain", "--", relative).strip())

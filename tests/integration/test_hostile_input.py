"""Generated hostile input: no payload or attribute map crashes parsing, and every message
comes out exactly once, as a valid event or as a dead letter with a kind. A producer that
puts personal data in attributes of its own leaks it into no file.

No step of the streaming path may raise on a message: on Dataflow a streaming bundle that
raises is retried forever, and its type stalls. Hostile payloads and attributes therefore
go through the whole path too, each DoFn called as a runner calls it (parse, encrypt, seal
the dead letters and the raw archive, and the Avro write and read of each)."""

from __future__ import annotations

import io
import json
import pathlib

import fastavro
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.metrics.metric import MetricsFilter
from fastavro.validation import validate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from event_delivery.cloud import files
from event_delivery.contract import envelope
from event_delivery.contract.dead_letters import ErrorKind, parsed_dead_letter_schema, quarantine_key_name
from event_delivery.contract.registry import event_type_from_schema, load_registry
from event_delivery.keys.fields import decrypt_bytes
from pipelines import backfill, redrive
from pipelines.delivery import deliver
from pipelines.redrive import ReplayDeadLettersFn
from tests.messages import malformed_messages, message, published_at, raw_message, valid_fields
from tests.streams import LATENESS, START, TRIGGER, WINDOW, Clock, local_keys, local_settings, streaming_pipeline
from tools.ops.audit import audit_type
from transforms.archive import ReplayArchiveFn, SealRawMessagesFn, parsed_raw_archive_schema
from transforms.parse import DEAD_LETTERS, RAW_MESSAGES, ParseEventFn
from transforms.personal import DEAD_LETTERS as UNDELIVERABLE
from transforms.personal import EncodeRecordsFn, EncryptPersonalFieldsFn
from transforms.sealed_dead_letters import SealDeadLettersFn
from transforms.sealing import JobKeyCache

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
    from tests.messages import valid_fields

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


def _files_with(root: pathlib.Path, marker: bytes) -> list[str]:
    """Files under ``root`` that hold ``marker``, in their bytes or in their Avro records read back."""
    leaking = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        readable = [path.read_bytes()]
        if path.suffix == ".avro":
            readable += [repr(record).encode() for record in files.read_avro(str(path))]
        if any(marker in text for text in readable):
            leaking.append(str(path.relative_to(root)))
    return leaking


def test_a_subject_id_in_a_producers_extra_attribute_is_sealed_everywhere_and_replays_restore_it(tmp_path):
    """A producer copies the subject id into an attribute of its own: the attribute is sealed with
    the payload in the dead letters and the raw archive, and is found in clear in no file of any
    run (the live one, a backfill, a redrive), while backfill and redrive replay it whole."""
    search, keys = load_registry()["search"], local_keys(tmp_path / "keys")
    subject = "user-424242"
    marker = {"producer_user": subject}
    valid = {**valid_fields(search, 1), "user_id": subject}
    clock = Clock(START)
    clock.arrive(
        message(valid, "valid", (START + 1) * 1000, **marker),
        message({**valid, "new_field": 1}, "names-subject", (START + 1) * 1000, **marker),  # malformed: quarantined
        raw_message(b"{oops", "quarantined", **marker, received_at=str((START + 1) * 1000)),  # likewise
    )
    clock.advance(WINDOW + LATENESS + TRIGGER)
    live = local_settings(tmp_path / "out" / "live", search, keys, raw_archive=True)
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), live)
    out = tmp_path / "out"
    assert _files_with(out, subject.encode()) == [], "the subject id is in clear"
    dead = [r for p in files.glob(f"{live.layout.dead_letter}/search/*/*/*.avro") for r in files.read_avro(p)]
    archived = [r for p in files.glob(f"{live.layout.raw_archive}/search/*/*/*.avro") for r in files.read_avro(p)]
    assert len(dead) == 2 and len(archived) == 3
    assert all(r["sealed_attributes"] and set(r["attributes"]) <= set(envelope.ENVELOPE_ATTRIBUTES) for r in dead)
    assert all(r["sealed_attributes"] and set(r["attributes"]) <= set(envelope.ENVELOPE_ATTRIBUTES) for r in archived)

    replay = ReplayArchiveFn(search, JobKeyCache(keys, search.name))
    replay.setup()
    replayed = [m for p in files.glob(f"{live.layout.raw_archive}/search/*/*/*.avro") for m in replay.process(p)]
    assert sorted(m.attributes[envelope.EVENT_ID] for m in replayed) == ["names-subject", "quarantined", "valid"]
    assert all(m.attributes["producer_user"] == subject for m in replayed), "the backfill replays it whole"
    redriven = ReplayDeadLettersFn(search, keys, "strip_unknown_fields")
    redriven.setup()
    messages = [
        m
        for p in files.glob(f"{live.layout.dead_letter}/search/*/*/*.avro")
        for m in redriven.process(p)
        if isinstance(m, PubsubMessage)
    ]
    assert sorted(m.attributes[envelope.EVENT_ID] for m in messages) == ["names-subject", "quarantined"]
    assert all(m.attributes["producer_user"] == subject for m in messages), "the redrive replays it whole"

    key_flags = [f"--keystore={keys.keystore}", f"--local_key_file={keys.local_key_file}"]
    hours = ["--start=1970-01-01T00", "--end=1970-01-02T00", f"--window_seconds={WINDOW}"]
    lateness = [f"--allowed_lateness_seconds={LATENESS}", "--late_horizon_seconds=86400"]
    backfill_args = [f"--raw_archive_root={out}/live/raw", f"--storage_root={out}/backfill", *hours, *lateness]
    assert backfill.main(["--event_type=search", *backfill_args, *key_flags]) == 0
    redrive_args = [f"--storage_root={out}/live", "--fix=strip_unknown_fields", *hours, *lateness]
    assert redrive.main(["--event_type=search", *redrive_args, *key_flags]) == 0
    late = [r["event_id"] for p in files.glob(f"{out}/live/late/search/*/*/*.avro") for r in files.read_avro(p)]
    assert late == ["names-subject"], "the fixed dead letter was redriven"
    assert _files_with(out, subject.encode()) == [], "the subject id is in clear after a backfill or a redrive"


def test_a_type_without_personal_fields_seals_a_message_with_attributes_of_its_own(tmp_path):
    """Its archive is in clear, but not an attribute nothing checks: that message is sealed whole
    under the quarantine key, and replays whole."""
    service_log, keys = load_registry()["service_log"], local_keys(tmp_path)
    key_cache = JobKeyCache(keys, service_log.name)
    seal = SealRawMessagesFn(service_log, key_cache)
    seal.setup()
    data = json.dumps(valid_fields(service_log)).encode()
    plain, extra = {"event_id": "plain"}, {"event_id": "extra", "producer_user": "user-424242"}
    records = {
        event_id: record
        for event_id, _, record in seal.seal(
            [(i, 1000, (None, 1000, a, data)) for i, a in (("plain", plain), ("extra", extra))]
        )
    }
    assert records["plain"]["payload"] == data and records["plain"]["attributes"] == plain
    assert records["extra"]["key_id"] and records["extra"]["attributes"] == {"event_id": "extra"}
    assert b"user-424242" not in repr(records["extra"]).encode()

    archive = tmp_path / "archive.avro"
    files.write_avro(str(archive), parsed_raw_archive_schema(), list(records.values()))
    replay = ReplayArchiveFn(service_log, key_cache)
    replay.setup()
    assert {m.attributes["event_id"]: (m.data, m.attributes) for m in replay.process(str(archive))} == {
        "plain": (data, plain),
        "extra": (data, extra),
    }


def test_a_subject_id_no_key_can_be_made_for_is_sealed_under_quarantine_and_stalls_nothing(tmp_path):
    """A payload whose subject is a lone surrogate (valid JSON: ``"\\ud800"``) has no pseudonym, so no
    subject key: parsing refuses it, so its dead letter and its archived copy are sealed under the
    type's quarantine key without a key lookup, and the hour around it is delivered and closed. On
    Dataflow a bundle that raised here would be retried forever, and the type would stall."""
    search, keys = load_registry()["search"], local_keys(tmp_path / "keys")
    received_at = (START + 1) * 1000
    unencodable = {
        "lone-high": {**valid_fields(search, 1), "user_id": "\ud800"},
        "lone-low": {**valid_fields(search, 2), "user_id": "x\udfff"},
        "lone-ahead": {**valid_fields(search, 3), "user_id": "\ud800", "new_field": 1},
    }
    assert all(b"\\ud" in message(f).data for f in unencodable.values()), "JSON escapes, as a producer sends them"
    valid = {f"ok-{i}": valid_fields(search, 10 + i) for i in range(3)}
    clock = Clock(START)
    clock.arrive(*(message(f, i, received_at) for i, f in {**unencodable, **valid}.items()))
    clock.advance(WINDOW + LATENESS + TRIGGER)
    settings = local_settings(tmp_path / "out", search, keys, raw_archive=True)
    pipeline = streaming_pipeline()
    deliver(pipeline | clock.finish(), settings)
    result = pipeline.run()
    result.wait_until_finish()

    [hour] = audit_type(settings.layout).hours.values()
    assert hour.closed and sorted(hour.delivered_ids) == sorted(valid)
    assert hour.dead_letter_kinds == {"schema_violation": len(unencodable)}
    quarantine = keys.open().named_key(quarantine_key_name("search", received_at))
    dead = {
        r["event_id"]: r
        for p in files.glob(f"{settings.layout.dead_letter}/search/*/*/*.avro")
        for r in files.read_avro(p)
    }
    assert sorted(dead) == sorted(unencodable)
    assert {r["quarantine_key_id"] for r in dead.values()} == {quarantine.key_id}
    for event_id, record in dead.items():
        payload = decrypt_bytes(
            quarantine.aead, record["payload"], "search", envelope.SEALED_PAYLOAD, quarantine.key_id, event_id
        )
        assert payload == message(unencodable[event_id]).data, "sealed whole, for a redrive"
    archived = {
        r["event_id"]: r["key_id"]
        for p in files.glob(f"{settings.layout.raw_archive}/search/*/*/*.avro")
        for r in files.read_avro(p)
    }
    assert sorted(archived) == sorted([*unencodable, *valid])
    assert {archived[i] for i in unencodable} == {quarantine.key_id}
    assert quarantine.key_id not in {archived[i] for i in valid}, "the valid ones under their subjects' keys"
    counted = result.metrics().query(MetricsFilter().with_namespace("delivery").with_name("unencodable_subject_ids"))
    assert sum(c.committed for c in counted["counters"]) == 0, "a malformed message's subject is never looked up"


def test_an_event_whose_subject_id_no_key_can_be_made_for_is_held_back_not_raised(tmp_path):
    """Parsing refuses such an id, but encryption does not rely on it: an event that reached it with
    one becomes a ``key_unavailable`` dead letter, without a key lookup for it, and the other
    events of its batch are sealed."""
    search = load_registry()["search"]
    encrypt = EncryptPersonalFieldsFn(search, JobKeyCache(local_keys(tmp_path), search.name))
    encrypt.setup()
    events = [("lone", 1000, {**valid_fields(search, 1), "user_id": "\ud800"}), ("ok", 1000, valid_fields(search, 2))]
    outputs = encrypt.seal(events)
    held_back = [o.value[0] for o in outputs if getattr(o, "tag", None) == UNDELIVERABLE]
    sealed = [o[0] for o in outputs if not hasattr(o, "tag")]
    assert (held_back, sealed) == (["lone"], ["ok"])


# The whole streaming path, step by step, as a runner calls each DoFn: parse, encrypt, seal the
# dead letters, seal the raw archive, and the Avro writes of each, read back as the close, the
# restart's deduplication and the audit read them.
LONE_SURROGATES = ["\ud800", "x\udfff"]  # valid JSON, spelt with escapes, that no UTF-8 file can hold
HOSTILE_VALUES = [
    2**31,
    2**63,
    -(2**63) - 1,
    10**400,  # valid JSON, but no Avro number holds it
    -(10**308) * 10,
    1e308,
    5e-324,
    -0.0,
    "a\x00b",
    *LONE_SURROGATES,
    "\U0001f3b5",
    "x" * 5000,
    "",
    [],
    {},
    None,
]
hostile_values = st.sampled_from(HOSTILE_VALUES) | json_values
long_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=200, max_size=1024)
HOSTILE_RECEIVED_AT = ["9" * 5000, "0" * 5000 + "1", "-1", "", " ", "1e3", "\x00", "9999-12-31T23:59:59-14:00"]
HOSTILE_RECEIVED_AT += ["0001-01-01T00:00:00+14:00", "2030-01-01T00:00:00", "１２３", "NaN", "1" * 14]
hostile_attributes = st.dictionaries(
    st.sampled_from(["event_id", "received_at", "event_type", "", "\x00", "a" * 256]) | wire_text,
    wire_text | long_text | st.sampled_from(HOSTILE_RECEIVED_AT),
    max_size=6,
)
SESSION_SCHEMA = pathlib.Path(__file__).parents[1] / "schemas" / "listening_session.avsc"
WHOLE_PATH_TYPES = {
    **load_registry(),
    "listening_session": event_type_from_schema(json.loads(SESSION_SCHEMA.read_text())),
}


@st.composite
def hostile_payloads(draw, event_type):
    """Bytes a producer might send: anything, a valid event with a field made hostile, dropped or
    added, its subject of the wrong type or unencodable, deep nesting, JSON in another encoding."""
    fields = valid_fields(event_type, draw(st.integers(0, 1000)))
    kind = draw(st.sampled_from(["bytes", "field", "subject", "drop", "add", "nested", "utf16", "valid"]))
    subject = event_type.subject_field
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "field":
        fields[draw(st.sampled_from(sorted(fields)))] = draw(hostile_values)
    elif kind == "subject" and subject:
        fields[subject] = draw(st.sampled_from(HOSTILE_VALUES))
    elif kind == "drop":
        del fields[draw(st.sampled_from(sorted(fields)))]
    elif kind == "add":
        fields[draw(wire_text)] = draw(hostile_values)
    elif kind == "nested":
        depth = draw(st.sampled_from([10, 900, 3000, 100_000]))
        value = (b"[" * depth + b"]" * depth).decode()
        where = draw(st.sampled_from(sorted(fields)))
        text = json.dumps({k: "\x00" if k == where else v for k, v in fields.items()})
        return text.replace('"\\u0000"', value, 1).encode()
    if kind == "utf16":  # JSON still, to a reader that guesses the encoding, with raw surrogates
        return json.dumps(fields, ensure_ascii=False).encode("utf-16", "surrogatepass")
    return json.dumps(fields).encode()  # lone surrogates as escapes, as a producer writes them


def _in_one_bundle(fn, elements) -> list:
    """``fn``'s outputs for ``elements`` in one bundle, as a runner calls a DoFn."""
    fn.start_bundle()
    return [o for e in elements for o in fn.process(e) or ()] + list(fn.finish_bundle() or ())


def _value(output):
    output = getattr(output, "value", output)  # tagged
    return getattr(output, "value", output)  # windowed


def _written_and_read_back(parsed_schema, records) -> list[dict]:
    buffer = io.BytesIO()
    fastavro.writer(buffer, parsed_schema, records)
    return list(fastavro.reader(io.BytesIO(buffer.getvalue())))


class WholePath:
    """One type's streaming path, each step a DoFn called as a runner calls it, with a local keystore."""

    def __init__(self, event_type, keys):
        self.event_type = event_type
        key_cache = JobKeyCache(keys, event_type.name)
        self.parse = ParseEventFn(
            event_type, 2**20, late_horizon_seconds=7 * 86400, max_future_seconds=3600, keep_raw=True
        )
        if event_type.subject_field:
            self.encrypt = EncryptPersonalFieldsFn(event_type, key_cache)
        else:
            self.encrypt = EncodeRecordsFn(event_type)
        self.seal_dead_letters = SealDeadLettersFn(event_type, key_cache)
        self.seal_raw = SealRawMessagesFn(event_type, key_cache)
        for fn in (self.parse, self.encrypt, self.seal_dead_letters, self.seal_raw):
            fn.setup()

    def run(self, messages) -> tuple[list, list, list]:
        """``(delivered, dead letters, archived)`` records, each written as Avro and read back."""
        parsed = [o for m in messages for o in self.parse.process(m)]
        events = [o for o in parsed if not hasattr(o, "tag")]
        dead = [o.value for o in parsed if getattr(o, "tag", None) == DEAD_LETTERS]
        raw = [o.value for o in parsed if getattr(o, "tag", None) == RAW_MESSAGES]
        sealed = _in_one_bundle(self.encrypt, events)
        events = [_value(o) for o in sealed if getattr(o, "tag", None) is None]
        dead += [_value(o) for o in sealed if getattr(o, "tag", None) == UNDELIVERABLE]
        letters = [_value(o)[2] for o in _in_one_bundle(self.seal_dead_letters, dead)]
        archived = [_value(o)[2] for o in _in_one_bundle(self.seal_raw, raw)]
        return (
            list(
                fastavro.reader(
                    io.BytesIO(files.encoded_avro(self.event_type.parsed_delivered_schema, [e[2] for e in events]))
                )
            ),
            _written_and_read_back(parsed_dead_letter_schema(), letters),
            _written_and_read_back(parsed_raw_archive_schema(), archived),
        )


@pytest.fixture(scope="module")
def whole_paths(tmp_path_factory):
    keys = local_keys(tmp_path_factory.mktemp("keys"))
    return {name: WholePath(event_type, keys) for name, event_type in WHOLE_PATH_TYPES.items()}


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(type_name=st.sampled_from(sorted(WHOLE_PATH_TYPES)), data=st.data())
def test_hostile_messages_pass_the_whole_path_each_once_and_nothing_raises(whole_paths, type_name, data):
    """Payloads and attributes, generated, through parse, encryption, the dead letters' sealing and
    the raw archive's, and the Avro files they are written to: no step raises (on Dataflow a
    streaming bundle that raises is retried forever, and the type stalls), every message comes out
    once, delivered or dead-lettered with a kind, and is archived once."""
    event_type = WHOLE_PATH_TYPES[type_name]
    payloads = data.draw(st.lists(hostile_payloads(event_type), min_size=1, max_size=4))
    messages = []
    for payload in payloads:
        attributes = data.draw(st.sampled_from([{"event_id": "e-1"}]) | hostile_attributes)
        messages.append(published_at(PubsubMessage(payload, attributes), ARRIVAL_MILLIS))
    delivered, dead, archived = whole_paths[type_name].run(messages)

    ids = sorted((m.attributes.get("event_id") or None) or "" for m in messages)
    assert sorted([r["event_id"] for r in delivered] + [r["event_id"] or "" for r in dead]) == ids, "each once"
    assert all(r["error_kind"] in ErrorKind.__members__ for r in dead)
    assert sorted(r["event_id"] or "" for r in archived) == ids, "each archived once"


@pytest.mark.parametrize("type_name", sorted(WHOLE_PATH_TYPES))
def test_every_field_set_to_each_hostile_value_passes_the_whole_path(whole_paths, type_name):
    """The values a generator rarely meets in one field, met in every field of every type, the
    subject's included, in one bundle: nothing raises, and every message comes out once."""
    event_type = WHOLE_PATH_TYPES[type_name]
    fields = valid_fields(event_type, 7)
    payloads = [json.dumps({**fields, name: value}).encode() for name in fields for value in HOSTILE_VALUES]
    payloads += [
        json.dumps({**fields, name: value}, ensure_ascii=False).encode("utf-16", "surrogatepass")
        for name in fields
        for value in LONE_SURROGATES
    ]
    extra = {"x" * 256: "\x00" * 1024, "": "", "\U0001f3b5": "\U0001f3b5" * 256}
    attributes = [extra] * len(payloads) + [{"received_at": value} for value in HOSTILE_RECEIVED_AT]
    payloads += [json.dumps(fields).encode()] * len(HOSTILE_RECEIVED_AT)
    messages = [
        published_at(PubsubMessage(p, {**a, "event_id": f"e{i}"}), ARRIVAL_MILLIS)
        for i, (p, a) in enumerate(zip(payloads, attributes, strict=True))
    ]
    delivered, dead, archived = whole_paths[type_name].run(messages)

    assert sorted([r["event_id"] for r in delivered + dead]) == sorted(m.attributes["event_id"] for m in messages)
    assert sorted(r["event_id"] for r in archived) == sorted(m.attributes["event_id"] for m in messages)
    assert all(r["error_kind"] in ErrorKind.__members__ for r in dead)
    assert delivered and dead, "some of them are still valid events"


def test_a_number_that_passes_validation_but_not_the_write_is_a_write_error(tmp_path):
    """Behind parsing, which refuses it: the write step gives up what fails as ``AvroWriteError``
    (``transforms.write``); anything else it raises fails the bundle for good."""
    schema = fastavro.parse_schema({"type": "record", "name": "R", "fields": [{"name": "x", "type": "double"}]})
    assert validate({"x": 10**400}, schema, raise_errors=False)
    with pytest.raises(files.AvroWriteError):
        files.write_avro(str(tmp_path / "r.avro"), schema, [{"x": 10**400}])


def _stored_rows(keys) -> int:
    """Every row of a SQLite keystore: subjects (and tombstones), data keys and named keys."""
    import sqlite3

    with sqlite3.connect(keys.keystore.removeprefix("sqlite:///")) as database:
        tables = ("subjects", "data_keys", "named_keys")
        return sum(database.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables)


def test_malformed_messages_naming_any_subject_make_no_key_and_are_quarantined(tmp_path):
    """Hostile input cannot grow the keystore: messages that fail validation, for every reason,
    each naming a subject never seen, are dead-lettered and archived under the day's quarantine key
    and make no key at all. What still gets its subject's key: a valid event, and its dead letter
    when its write fails, which forget reaches."""
    from transforms.sealing import dead_letter_as_arrived

    search, keys = load_registry()["search"], local_keys(tmp_path)
    path = WholePath(search, keys)
    path.parse.max_event_bytes = 4096  # as the job's --max_event_bytes would set it

    def naming(subject: str, seed: int) -> list[PubsubMessage]:
        fields = {**valid_fields(search, seed), "user_id": subject}
        return [published_at(m, ARRIVAL_MILLIS) for m in malformed_messages(search, fields, subject, 4096)]

    path.run(naming("stranger-0", 0))  # makes the day's quarantine key
    before = _stored_rows(keys)
    strangers = [f"stranger-{i}" for i in range(1, 41)]
    messages = [m for i, s in enumerate(strangers) for m in naming(s, i)]
    delivered, dead, archived = path.run(messages)
    assert not delivered and len(dead) == len(archived) == len(messages) == 9 * len(strangers)
    assert _stored_rows(keys) == before, "no key, pseudonym or tombstone for any subject they name"
    keystore = keys.open()
    assert set(keystore.subject_key_ids(strangers, create=False, scope=search.name).values()) == {None}
    quarantine = keystore.named_key(quarantine_key_name("search", ARRIVAL_MILLIS)).key_id
    assert {r["quarantine_key_id"] for r in dead} == {r["key_id"] for r in archived} == {quarantine}

    valid = {**valid_fields(search, 99), "user_id": "regular"}
    path.run([published_at(message(valid, "valid"), ARRIVAL_MILLIS)])
    [key_id] = keystore.subject_key_ids(["regular"], create=False, scope=search.name).values()
    assert key_id and _stored_rows(keys) > before, "a valid event's subject does get a key"
    failed_write = dead_letter_as_arrived("search", ErrorKind.WRITE_FAILED, "t", "valid", ARRIVAL_MILLIS, valid)
    [(_, _, letter)] = path.seal_dead_letters.seal([failed_write])
    assert letter["quarantine_key_id"] == key_id, "a valid event's dead letter is sealed under its subject's key"

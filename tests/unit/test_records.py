"""An event is sealed and encoded once, where it is read, and crosses the shuffles as its record's
bytes (``transforms.records``); a pane's file is those bytes in Avro blocks, as fastavro writes them."""

from __future__ import annotations

import copy
import io
import json
import pathlib
import tempfile
from unittest import mock

import apache_beam as beam
import fastavro
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import IntervalWindow
from hypothesis import example, given, settings
from hypothesis import strategies as st

from event_delivery.cloud import files
from event_delivery.contract.registry import event_type_from_schema, load_registry
from event_delivery.keys.config import KeyConfig
from event_delivery.keys.fields import decrypt_value
from tests.messages import valid_fields
from tests.streams import local_keys, local_settings
from transforms import records
from transforms.personal import EncryptPersonalFields, EncryptPersonalFieldsFn
from transforms.records import RecordCoder, encoded_event, event_record, schema_fingerprint
from transforms.reports import DELIVERED
from transforms.sealed_dead_letters import UnsealFailedWritesFn
from transforms.sealing import JobKeyCache
from transforms.write import WriteBoundedPaneFn


def delivered_records(event_type, n: int) -> list[dict]:
    """``n`` delivered records of ``event_type``, forgotten subjects' (personal fields null)."""
    nulls = dict.fromkeys(event_type.personal_fields)
    return [event_record((f"e{i}", 1000 + i, {**valid_fields(event_type, i), **nulls})) for i in range(n)]


@pytest.mark.parametrize("codec", files.CODECS + (files.UNCOMPRESSED,))
@pytest.mark.parametrize("n", [0, 1, 2_000])
def test_records_encoded_one_by_one_make_the_file_fastavro_writes_of_them(codec, n):
    event_type = load_registry()["service_log"]
    schema, written = event_type.parsed_delivered_schema, delivered_records(event_type, n)
    coder = RecordCoder(schema)

    concatenated = files.encoded_avro(schema, [coder.encode(r) for r in written], codec)

    whole = io.BytesIO()
    fastavro.writer(whole, schema, written, codec=codec)
    assert list(fastavro.reader(io.BytesIO(concatenated))) == list(fastavro.reader(io.BytesIO(whole.getvalue())))
    blocks = list(fastavro.block_reader(io.BytesIO(concatenated)))
    assert sum(b.num_records for b in blocks) == n
    assert all(b.size < 2 * files.BLOCK_BYTES for b in blocks), "cut into blocks as fastavro cuts them"
    assert len(blocks) > 1 or n < 100


@settings(max_examples=60, deadline=None)
@given(event_ids=st.lists(st.text(max_size=40), max_size=40))
def test_a_files_ids_read_from_its_header_are_its_records_ids_in_order(event_ids):
    # Any text an id may hold (quotes, newlines, separators), and repeats: what the close indexes
    # and the late path checks must be exactly the ids the file holds.
    event_type = load_registry()["service_log"]
    schema, coder = event_type.parsed_delivered_schema, RecordCoder(event_type.parsed_delivered_schema)
    encoded = [coder.encode(event_record((i, 1000 + n, valid_fields(event_type, n)))) for n, i in enumerate(event_ids)]
    with_header = files.encoded_avro(schema, encoded, header=files.ids_header(event_ids, encoded))

    assert _ids_read_from(with_header) == event_ids
    assert [r["event_id"] for r in fastavro.reader(io.BytesIO(with_header))] == event_ids
    without = files.encoded_avro(schema, encoded)
    assert _ids_read_from(without) == event_ids, "a file written before ids were in headers: read from its records"


def test_a_file_whose_header_holds_its_ids_is_not_decoded_to_read_them():
    schema = load_registry()["service_log"].parsed_delivered_schema
    not_a_record = b"\xff\xff\xff"  # decoding this fails: only the header may be read

    header = files.ids_header(["e1"], [not_a_record])
    assert _ids_read_from(files.encoded_avro(schema, [not_a_record], header=header)) == ["e1"]


def _ids_only(event_ids):  # a pane's header as the version before sizes wrote it
    return {files.EVENT_IDS: json.dumps(event_ids)}


@settings(max_examples=40, deadline=None)
@given(
    event_ids=st.lists(st.text(max_size=20), max_size=30),
    left_out=st.sets(st.text(max_size=20), max_size=3),
    header=st.sampled_from(["ids and sizes", "ids only", "none"]),
    codec=st.sampled_from([files.UNCOMPRESSED, *files.CODECS]),
)
def test_a_rewrite_keeps_every_record_but_those_left_out_in_order_whether_cut_apart_or_decoded(
    event_ids, left_out, header, codec
):
    event_type = load_registry()["service_log"]
    schema, coder = event_type.parsed_delivered_schema, RecordCoder(event_type.parsed_delivered_schema)
    records = [event_record((i, 1000 + n, valid_fields(event_type, n))) for n, i in enumerate(event_ids)]
    left_out |= set(event_ids[:1])  # an id the files hold, when they hold one
    halves = (records[: len(records) // 2], records[len(records) // 2 :])  # two panes, one part
    with tempfile.TemporaryDirectory() as folder, mock.patch.object(files, "BLOCK_BYTES", 300):  # blocks of a few
        sources = [f"{folder}/pane{n}.avro" for n in range(2)]
        for path, pane in zip(sources, halves, strict=True):
            encoded, ids = [coder.encode(r) for r in pane], [r["event_id"] for r in pane]
            headers = {"ids and sizes": files.ids_header(ids, encoded), "ids only": _ids_only(ids), "none": None}
            files.write_bytes(path, files.encoded_avro(schema, encoded, header=headers[header]))
        staged = {path: files.read_avro(path) for path in sources}
        leave_out = {sources[0]: left_out, sources[1]: set(event_ids[-1:])}  # each source its own
        kept = files.rewrite_avro_without(sources, f"{folder}/part.avro", leave_out, codec)
        with open(f"{folder}/part.avro", "rb") as handle:
            part = fastavro.reader(handle)
            assert part.codec == codec
            written = list(part)
    expected = [r for path in sources for r in staged[path] if r["event_id"] not in leave_out[path]]
    assert written == expected and kept == len(written)
    assert [r["event_id"] for path in sources for r in staged[path]] == event_ids


def _undecodable(event_ids: list[str]) -> list[bytes]:
    """Records that begin with their ids, as every delivered schema's do, and that decoding cannot read past
    them (a ``received_at`` cut short)."""
    return [files.avro_string(event_id) + b"\xff" * (n + 1) for n, event_id in enumerate(event_ids)]


def test_a_rewrite_cuts_records_apart_by_the_sizes_in_the_header_without_decoding_them(tmp_path):
    schema = load_registry()["service_log"].parsed_delivered_schema
    not_records = _undecodable(["a", "b", "c"])
    pane, part = str(tmp_path / "pane.avro"), str(tmp_path / "part.avro")
    header = files.ids_header(["a", "b", "c"], not_records)
    files.write_bytes(pane, files.encoded_avro(schema, not_records, header=header))

    assert files.rewrite_avro_without([pane], part, {pane: {"b"}}, files.UNCOMPRESSED) == 2
    with open(part, "rb") as handle:
        written = b"".join(block.bytes_.read() for block in fastavro.block_reader(handle))
    assert written == not_records[0] + not_records[2]
    other = str(tmp_path / "other.avro")  # a pane of another schema: its records cannot join these
    header = files.ids_header(["d"], _undecodable(["d"]))
    files.write_bytes(other, files.encoded_avro({**schema, "doc": "another"}, _undecodable(["d"]), header=header))
    with pytest.raises(ValueError, match="another writer schema"):
        files.rewrite_avro_without([pane, other], part, {})


@pytest.mark.parametrize(
    "event_ids, sizes",
    [
        ("abc", [3, 4, 6]),  # the last read comes short
        ("abc", [3, 4, 4]),  # bytes left in the block
        ("ab", [3, 4]),  # fewer records listed than the block holds
        ("abcd", [3, 4, 5, 1]),  # more records listed than the blocks hold
        ("abc", [4, 4, 4]),  # the sizes add up, but cut the records wrong
        ("abc", [3, 4]),  # ids and sizes do not pair
    ],
)
def test_a_header_that_does_not_fit_the_records_is_refused(tmp_path, event_ids, sizes):
    schema = load_registry()["service_log"].parsed_delivered_schema
    pane, part = str(tmp_path / "pane.avro"), str(tmp_path / "part.avro")
    records = _undecodable(["a", "b", "c"])  # 3, 4 and 5 bytes
    wrong = {files.EVENT_IDS: json.dumps(list(event_ids)), files.RECORD_SIZES: json.dumps(sizes)}
    files.write_bytes(pane, files.encoded_avro(schema, records, header=wrong))

    with pytest.raises(ValueError, match="header of"):
        files.rewrite_avro_without([pane], part, {})


def test_records_of_a_schema_that_does_not_begin_with_the_id_are_decoded_not_cut(tmp_path):
    """Cutting checks each record's id where every delivered schema has it, first: a file of any other
    schema is decoded, whatever its header lists."""
    delivered = load_registry()["service_log"].parsed_delivered_schema
    fields = delivered["fields"]
    schema = fastavro.parse_schema({**delivered, "fields": [*fields[1:], fields[0]]})  # the id last
    records = [event_record((i, 1000, valid_fields(load_registry()["service_log"], 0))) for i in ("a", "b")]
    encoded = []
    for record in records:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, schema, record)
        encoded.append(buffer.getvalue())
    bogus = {files.EVENT_IDS: json.dumps(["a", "b"]), files.RECORD_SIZES: json.dumps([1, sum(map(len, encoded)) - 1])}
    pane, part = str(tmp_path / "pane.avro"), str(tmp_path / "part.avro")
    files.write_bytes(pane, files.encoded_avro(schema, encoded, header=bogus))

    assert files.rewrite_avro_without([pane], part, {pane: {"a"}}) == 1
    assert [r["event_id"] for r in files.read_avro(part)] == ["b"]


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
@example(text="x" * 63)
@example(text="x" * 64)  # the first length of two bytes
@example(text="é" * 32)  # 64 bytes in UTF-8
def test_an_id_is_encoded_as_avro_encodes_a_string(text):
    encoded = io.BytesIO()
    fastavro.schemaless_writer(encoded, "string", text)
    assert files.avro_string(text) == encoded.getvalue()


def test_a_rewrite_whose_first_source_cannot_be_read_leaves_no_file(tmp_path):
    """A late move of a staged file that is not Avro (cut short before its header ended) fails before it
    makes the late file, which consumers would read as it is."""
    (tmp_path / "pane.avro").write_bytes(b"Obj\x01")
    with pytest.raises(ValueError):
        files.rewrite_avro_without([str(tmp_path / "pane.avro")], str(tmp_path / "late.avro"), {})
    assert not (tmp_path / "late.avro").exists()


@pytest.mark.parametrize(
    "event_ids, root, in_header",
    [
        ([f"e{n}" for n in range(50)], "staging", True),
        ([f"{n:0200d}" for n in range(50)], "staging", False),  # the ids weigh more than half the records
        ([f"e{n}" for n in range(50)], "late", False),  # a late file is published as it is written
        ([f"{'é' * 20}{n}" for n in range(50)], "staging", False),  # in JSON each é weighs 6 bytes
    ],
)
def test_a_staged_pane_carries_its_ids_in_its_header_where_its_records_weigh_twice_as_much(
    tmp_path, event_ids, root, in_header
):
    log = load_registry()["service_log"]
    delivery = local_settings(str(tmp_path), log, KeyConfig("sqlite:///unused.db", "unused.key"), window_seconds=3600)
    coder, received_at = RecordCoder(log.parsed_delivered_schema), 3600_000
    events = [
        encoded_event(i, received_at, coder.encode(event_record((i, received_at, valid_fields(log, n)))), False)
        for n, i in enumerate(event_ids)
    ]
    fn = WriteBoundedPaneFn(delivery, getattr(delivery.layout, root), DELIVERED, log.delivered_schema, None)
    fn.setup()

    [(_, _, path)] = fn.write(((0, ""), events), IntervalWindow(3600, 7200), 0)

    with open(path, "rb") as handle:
        header = fastavro.reader(handle).metadata
    assert json.loads(header.get(files.EVENT_IDS, "null")) == (event_ids if in_header else None)
    assert (files.RECORD_SIZES in header) == in_header, "the records' sizes go with their ids"
    assert files.read_event_ids(path) == event_ids


def _ids_read_from(data: bytes) -> list[str]:
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "pane.avro"
        path.write_bytes(data)
        return files.read_event_ids(str(path))


def test_a_record_the_schema_does_not_take_is_refused_without_quoting_it():
    event_type = load_registry()["service_log"]
    coder = RecordCoder(event_type.parsed_delivered_schema)
    [record] = delivered_records(event_type, 1)
    for misfit in ({"received_at": "secret-value"}, {"message": ["secret-value"]}, {"received_at": 2**70}):
        with pytest.raises(files.AvroWriteError) as refused:
            coder.encode({**record, **misfit})
        assert "secret-value" not in str(refused.value)
    counters = fastavro.parse_schema(
        {"type": "record", "name": "C", "fields": [{"name": "m", "type": {"type": "map", "values": "int"}}]}
    )
    with pytest.raises(files.AvroWriteError):  # a list where the schema has a map
        RecordCoder(counters).encode({"m": ["secret-value"]})
    assert coder.decode(coder.encode(record)) == record, "a timestamp-millis decodes as the int it was"


def test_sealed_events_leave_sealing_as_their_encoded_records_with_personal_fields_sealed(tmp_path):
    """What crosses every shuffle after sealing: ``(id, received_at, bytes, forgotten)``, no field dict."""
    search = load_registry()["search"]
    keys = local_keys(tmp_path)
    events = [(f"e{i}", 1000 + i, valid_fields(search, i)) for i in range(5)]

    with TestPipeline() as pipeline:
        sealed = pipeline | beam.Create(events) | EncryptPersonalFields(search, JobKeyCache(keys, search.name))
        shapes = sealed.output | "Shapes" >> beam.Map(lambda e: tuple(type(v).__name__ for v in e))
        assert_that(shapes, equal_to([("str", "int", "bytes", "bool")] * len(events)))
        opened = sealed.output | "Open" >> beam.Map(_opened, search, keys)
        assert_that(opened, equal_to([event_record(e) for e in events]), label="Opened")


def _opened(event, event_type, keys) -> dict:
    """The encoded event's record, its personal fields decrypted with the keystore's keys."""
    record = RecordCoder(event_type.parsed_delivered_schema).decode(event[2])
    key_id = record.pop("key_id")
    _, aead = JobKeyCache(keys, event_type.name).acquire().data_keys([key_id])[key_id]
    for field in event_type.personal_fields:
        record[field] = decrypt_value(aead, record[field], event_type.name, field, key_id, record["event_id"])
    return record


def test_a_failed_writes_dead_letters_carry_each_event_as_it_arrived_whatever_its_schema_holds(tmp_path):
    """A pane whose write fails for good is unsealed back to the messages as they arrived: a record
    with nested records, maps, unions and logical types (a timestamp, a uuid) decodes to the values
    its JSON payload carried, so that a redrive replays them."""
    schema = json.loads((pathlib.Path(__file__).parents[1] / "schemas" / "listening_session.avsc").read_text())
    sessions = event_type_from_schema(schema, "listening_session")
    key_cache = JobKeyCache(local_keys(tmp_path), sessions.name)
    arrived = [(f"e{i}", 1000 + i, valid_fields(sessions, i)) for i in range(4)]
    seal, unseal = EncryptPersonalFieldsFn(sessions, key_cache), UnsealFailedWritesFn(sessions, key_cache)
    seal.setup()
    unseal.setup()
    sealed = seal.seal(arrived)
    assert all(isinstance(event[2], bytes) for event in sealed)

    letters = list(unseal.process(("writing delivered failed: Forbidden", sealed)))

    assert [json.loads(letter[2]["payload"]) for letter in letters] == [fields for _, _, fields in arrived]
    assert {letter[2]["error_kind"] for letter in letters} == {"WRITE_FAILED"}


def test_a_forgotten_subjects_event_whose_record_fails_is_counted_as_a_dead_letter_only(tmp_path, monkeypatch):
    """Every event is counted once: delivered forgotten (its personal fields null), or dead-lettered."""
    search = load_registry()["search"]
    keys = local_keys(tmp_path)
    events = [(f"e{i}", 1000 + i, {**valid_fields(search, i), "user_id": "alice"}) for i in range(3)]
    JobKeyCache(keys, search.name).acquire().lookup(["alice"])  # alice has a key, then is forgotten
    assert keys.open().forget("alice")
    as_record = records.event_record
    monkeypatch.setattr(
        records, "event_record", lambda e: {**as_record(e), "received_at": "x"} if e[0] == "e0" else as_record(e)
    )

    pipeline = TestPipeline()
    sealed = pipeline | beam.Create(events) | EncryptPersonalFields(search, JobKeyCache(keys, search.name))
    assert_that(sealed.output | "Ids" >> beam.Map(lambda e: (e[0], e[3])), equal_to([("e1", True), ("e2", True)]))
    assert_that(sealed.dead_letters | "Dead" >> beam.Map(lambda d: d[0]), equal_to(["e0"]), label="Dead")
    counters = pipeline.run().metrics().query(MetricsFilter().with_name("forgotten_subject_events"))["counters"]
    assert [c.committed for c in counters] == [2]


def test_the_schema_fingerprint_changes_with_anything_a_files_header_holds():
    """An hour's files of one run share parts, which take one schema, header and all: so the
    fingerprint that ``make update`` keeps changes with a doc or a default too, not only with
    what the bytes of a record depend on."""
    original = json.loads((pathlib.Path(__file__).parents[1] / "schemas" / "listening_session.avsc").read_text())

    def fingerprint(change=lambda schema: None) -> int:
        schema = copy.deepcopy(original)
        change(schema)
        return schema_fingerprint(event_type_from_schema(schema, "listening_session"))

    def field(schema, name) -> dict:
        return next(f for f in schema["fields"] if f["name"] == name)

    changes = {
        "a doc": lambda s: s.update(doc="another"),
        "a default": lambda s: field(s, "score").update(default=None, type=["null", "string", "int"]),
        "a logical type": lambda s: field(s, "session_uuid").update(type="string"),
        "a field added": lambda s: s["fields"].append({"name": "extra", "type": ["null", "int"], "default": None}),
    }
    assert fingerprint() == fingerprint(), "the same schema, the same fingerprint"
    assert {what for what, change in changes.items() if fingerprint(change) == fingerprint()} == set()

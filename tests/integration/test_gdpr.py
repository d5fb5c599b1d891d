"""Crypto-shredding end to end: deliver, decrypt, forget, and scan every output byte for leaks.

The delivery path runs on a TestStream and writes to local folders; the decrypt job
runs on its output. The keystore is SQLite with a local key file.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import pathlib
import sqlite3
import struct

import apache_beam as beam
import pytest

from event_delivery.cloud import files
from event_delivery.contract.registry import load_registry
from pipelines.decrypt import decrypt
from pipelines.delivery import deliver
from pipelines.runtime import LOCAL_RUNNER, partition_paths
from tests.messages import malformed_messages, message, raw_message, valid_fields
from tests.streams import LATENESS, START, TRIGGER, WINDOW, Clock, local_keys, local_settings, streaming_pipeline

PERSONAL_TYPES = sorted(name for name, t in load_registry().items() if t.personal_fields)


@pytest.fixture
def keys(tmp_path):
    return local_keys(tmp_path)


def settings_for(tmp_path, event_type, keys, run_id="run1"):
    """Local delivery that also keeps the raw archive, so every test covers it too."""
    return local_settings(tmp_path / "out", event_type, keys, run_id, raw_archive=True)


def deliver_events(settings, events, start=START, late_events=()):
    """Delivers ``(event_id, fields)`` pairs and raw messages, lets the hour close, then
    delivers ``late_events`` for the same hour, which therefore go to the late root."""

    def as_message(m):
        return m if not isinstance(m, tuple) else message(m[1], m[0], (start + 1) * 1000)

    clock = Clock(start)
    clock.arrive(*(as_message(m) for m in events))
    clock.advance(WINDOW + LATENESS + TRIGGER)
    if late_events:
        clock.arrive(*(as_message(m) for m in late_events))
        clock.advance(TRIGGER * 2)
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), settings)


def decrypted(tmp_path, event_type, keys) -> dict[str, dict]:
    """Runs the decrypt job over every delivered hour; returns records by event id."""
    root = str(tmp_path / "out" / "delivered")
    paths = partition_paths(root, event_type.name, *_all_time())
    with beam.Pipeline(runner=LOCAL_RUNNER) as pipeline:
        decrypt(pipeline, paths, event_type, keys, root, str(tmp_path / "clear"))
    records = [r for p in files.glob(f"{tmp_path}/clear/{event_type.name}/*/*/*.avro") for r in files.read_avro(p)]
    return {r["event_id"]: r for r in records}


def _all_time():
    import datetime

    utc = datetime.timezone.utc
    return datetime.datetime(1970, 1, 1, tzinfo=utc), datetime.datetime(2100, 1, 1, tzinfo=utc)


@pytest.mark.parametrize("type_name", PERSONAL_TYPES)
def test_deliver_then_decrypt_gives_back_the_original(tmp_path, keys, type_name):
    event_type = load_registry()[type_name]
    originals = {f"e{i}": valid_fields(event_type, i) for i in range(12)}
    deliver_events(settings_for(tmp_path, event_type, keys), list(originals.items()))

    delivered = [r for p in files.glob(f"{tmp_path}/out/delivered/{type_name}/*/*/*.avro") for r in files.read_avro(p)]
    assert len(delivered) == len(originals)
    for record in delivered:
        assert record["key_id"]
        for field in event_type.personal_fields:
            value = originals[record["event_id"]][field]
            assert (record[field] is None) == (value is None)
            assert value is None or isinstance(record[field], bytes) and record[field] != value

    clear = decrypted(tmp_path, event_type, keys)
    assert set(clear) == set(originals)
    for event_id, fields in originals.items():
        assert {name: clear[event_id][name] for name in fields} == fields


def test_each_event_of_a_shared_pane_is_sealed_under_its_own_subjects_key(tmp_path, keys):
    """A pane mixes subjects. A pane sealed under one subject's key would still decrypt,
    since decryption follows the record's key id, but forgetting that one subject would
    then shred the others' events and leave the forgotten subject's own readable."""
    search = load_registry()["search"]
    subjects = ["alice", "bob", "carol"]
    originals = {f"e{i}": {**valid_fields(search, i), "user_id": subjects[i % 3]} for i in range(9)}
    one_shard = dataclasses.replace(settings_for(tmp_path, search, keys), num_shards=1)
    deliver_events(one_shard, list(originals.items()))

    [path] = files.glob(f"{tmp_path}/out/delivered/search/*/*/*.avro")  # one shard, one pane: one file
    records = files.read_avro(path)
    assert sorted(r["event_id"] for r in records) == sorted(originals)
    key_ids = keys.open().subject_key_ids(subjects, create=False, scope=search.name)
    assert len(set(key_ids.values()) - {None}) == len(subjects), "each subject has a key of its own"
    sealed_under = {r["event_id"]: r["key_id"] for r in records}
    assert sealed_under == {event_id: key_ids[fields["user_id"]] for event_id, fields in originals.items()}


def test_forget_shreds_past_and_future_events_of_one_subject(tmp_path, keys):
    search = load_registry()["search"]
    alice = {f"a{i}": {**valid_fields(search, i), "user_id": "alice"} for i in range(3)}
    bob = {f"b{i}": {**valid_fields(search, 10 + i), "user_id": "bob"} for i in range(3)}
    deliver_events(settings_for(tmp_path, search, keys), list({**alice, **bob}.items()))
    keystore = keys.open()
    assert keystore.forget("alice")

    clear = decrypted(tmp_path, search, keys)
    for event_id in alice:
        assert clear[event_id]["user_id"] is None and clear[event_id]["query"] is None
        assert clear[event_id]["results_count"] == alice[event_id]["results_count"], "other fields stay"
    for event_id, fields in bob.items():
        assert clear[event_id]["user_id"] == "bob" and clear[event_id]["query"] == fields["query"]

    database = tmp_path / "keystore.db"
    keys_before = sqlite3.connect(database).execute("SELECT COUNT(*) FROM data_keys").fetchone()[0]
    later = {f"later{i}": {**valid_fields(search, 20 + i), "user_id": "alice"} for i in range(4)}
    deliver_events(settings_for(tmp_path, search, keys, run_id="run2"), list(later.items()), start=START + 3600)
    keys_after = sqlite3.connect(database).execute("SELECT COUNT(*) FROM data_keys").fetchone()[0]
    assert keys_after == keys_before, "no new key for a forgotten subject"

    later_records = [
        r
        for p in files.glob(f"{tmp_path}/out/delivered/search/dt=1970-01-01/hr=02-00-00/*.avro")
        for r in files.read_avro(p)
    ]
    assert sorted(r["event_id"] for r in later_records) == sorted(later)
    assert all(r["key_id"] is None and r["user_id"] is None and r["query"] is None for r in later_records)
    manifest = json.loads(
        pathlib.Path(f"{tmp_path}/out/delivered/search/dt=1970-01-01/hr=02-00-00/_SUCCESS").read_text()
    )
    assert manifest["accounting"]["forgotten"] == 4


def test_a_subject_is_delivered_under_a_key_id_of_its_own_in_each_type(tmp_path, keys):
    """The clear key id links nothing across types, and forget erases the subject in every type;
    a type the subject is first seen in after the forget gets no key for it."""
    registry = load_registry()
    key_ids = {}
    for name in ("search", "play"):
        event_type = registry[name]
        events = [(f"{name}-{i}", {**valid_fields(event_type, i), "user_id": "alice"}) for i in range(2)]
        deliver_events(settings_for(tmp_path, event_type, keys, run_id=name), events)
        paths = files.glob(f"{tmp_path}/out/delivered/{name}/*/*/*.avro")
        key_ids[name] = {r["key_id"] for p in paths for r in files.read_avro(p)}
    assert len(key_ids["search"]) == len(key_ids["play"]) == 1
    assert key_ids["search"] != key_ids["play"]
    keystore = keys.open()
    assert keystore.key_ids_of("alice") == sorted(key_ids["search"] | key_ids["play"])

    assert keystore.forget("alice")
    assert set(keystore.data_keys(key_ids["search"] | key_ids["play"]).values()) == {None}
    page_view = registry["page_view"]
    later = [("page-0", {**valid_fields(page_view, 0), "user_id": "alice"})]
    deliver_events(settings_for(tmp_path, page_view, keys, run_id="page_view"), later)
    [record] = [r for p in files.glob(f"{tmp_path}/out/delivered/page_view/*/*/*.avro") for r in files.read_avro(p)]
    assert record["key_id"] is None and record["user_id"] is None
    assert keystore.key_ids_of("alice") == []


def _avro_types(event_type, field: str) -> set[str]:
    """The Avro type names a field may hold, e.g. ``{"null", "double"}`` for an optional double."""
    [declared] = [f["type"] for f in event_type.schema["fields"] if f["name"] == field]
    branches = declared if isinstance(declared, list) else [declared]
    return {b if isinstance(b, str) else b["type"] for b in branches}


def _number_leak_forms(value: float) -> list[bytes]:
    """A double as text (as JSON and logs write it) and as bytes (Avro writes it little-endian)."""
    return _leak_forms(repr(value)) + [struct.pack("<d", value), struct.pack(">d", value)]


def _leak_forms(marker: str) -> list[bytes]:
    raw = marker.encode()
    forms = [raw, marker.encode("utf-16-le")]
    for shift in range(3):  # base64 of the marker at every alignment inside a longer value
        encoded = base64.b64encode(b"x" * shift + raw)[4 if shift else 0 :]
        forms.append(encoded[: len(encoded) - 4])
    return forms


def _read_if_present(path: pathlib.Path) -> bytes:
    """SQLite removes its WAL file when the last connection closes, which may be now."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _readable_bytes(path: pathlib.Path) -> bytes:
    """A file's bytes, plus, for Avro, every decoded value: compression must not hide a leak."""
    data = path.read_bytes()
    if path.suffix != ".avro":
        return data
    values = []
    for record in files.read_avro(str(path)):
        for value in record.values():
            values.append(value if isinstance(value, bytes) else str(value).encode())
    return data + b"\0".join(values)


def test_no_personal_value_leaks_into_any_file_or_log(tmp_path, keys, caplog):
    caplog.set_level(logging.DEBUG)
    markers = {}  # what was planted -> the byte forms it would take if it leaked
    for type_name in PERSONAL_TYPES:
        event_type = load_registry()[type_name]
        events = []
        for i in range(8):
            fields = valid_fields(event_type, i)
            for n, field in enumerate(event_type.personal_fields):
                types = _avro_types(event_type, field)
                if "string" in types:
                    fields[field] = f"LEAKMARK{type_name}{field}{i}Z"
                    markers[fields[field]] = _leak_forms(fields[field])
                elif "double" in types:
                    # More digits than a generated value has, within every latitude and longitude.
                    fields[field] = float(f"{i + 1}.{n}135792468{i}")
                    markers[f"{type_name}.{field}={fields[field]!r}"] = _number_leak_forms(fields[field])
                else:
                    pytest.fail(f"no leak marker for {type_name}.{field} of type {sorted(types)}")
            events.append((f"e{i}", fields))
        # Dead letters hold raw payloads: personal values inside broken messages.
        secret = f"LEAKMARK{type_name}deadletter"
        markers[secret] = _leak_forms(secret)
        events.append(raw_message(f'{{"user_id": "{secret}", '.encode(), "dl-1"))
        events.append(raw_message(json.dumps({**events[0][1], secret: secret}).encode(), "dl-2"))
        deliver_events(settings_for(tmp_path, event_type, keys), events[:6] + events[8:], late_events=events[6:8])

    outputs = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    for kind in ("_SUCCESS", "/late/", "/dead-letter/", "/delivered/", "/raw/"):
        assert any(kind in str(p) for p in outputs), f"the scan covers {kind}"
    blobs = {str(p): _readable_bytes(p) for p in outputs}
    blobs["keystore"] = b"".join(_read_if_present(p) for p in tmp_path.glob("keystore.db*"))
    blobs["captured logs"] = caplog.text.encode()
    leaks = [
        (marker, where)
        for marker, forms in markers.items()
        for where, blob in blobs.items()
        if any(form in blob for form in forms)
    ]
    assert not leaks


def test_a_dead_letter_payload_opens_with_its_quarantine_key(tmp_path, keys):
    from event_delivery.contract.dead_letters import quarantine_key_name
    from event_delivery.keys.fields import decrypt_bytes

    search = load_registry()["search"]
    broken = b'{"user_id": "someone", "query": '
    deliver_events(settings_for(tmp_path, search, keys), [raw_message(broken, "dl-1")])
    [record] = [r for p in files.glob(f"{tmp_path}/out/dead-letter/search/*/*/*.avro") for r in files.read_avro(p)]
    assert record["payload"] != broken and record["error_kind"] == "NOT_JSON"
    key = keys.open().named_key(quarantine_key_name("search", int(record["received_at"].timestamp() * 1000)))
    assert record["quarantine_key_id"] == key.key_id
    assert decrypt_bytes(key.aead, record["payload"], "search", "payload", key.key_id, "dl-1") == broken


def test_a_step_that_raises_leaks_nothing_into_its_exception_or_the_logs(tmp_path, keys, caplog, monkeypatch):
    """A failing bundle holds cleartext events; the runner's error and logs must not show them."""
    import traceback

    from event_delivery.keys.cache import KeyCache

    def keystore_down(self, subjects):
        list(subjects)
        raise RuntimeError("keystore unavailable")

    monkeypatch.setattr(KeyCache, "lookup", keystore_down)
    caplog.set_level(logging.DEBUG)
    search = load_registry()["search"]
    events = []
    for i in range(4):
        fields = {**valid_fields(search, i), "query": f"LEAKMARKquery{i}Z", "user_id": f"LEAKMARKuser{i}Z"}
        events.append((f"e{i}", fields))
    with pytest.raises(Exception) as failed:
        deliver_events(settings_for(tmp_path, search, keys), events)

    told = "".join(traceback.format_exception(failed.value))
    assert "keystore unavailable" in told, "the step did fail, and said why"
    assert "LEAKMARK" not in told
    assert "LEAKMARK" not in caplog.text


def test_each_day_has_its_own_quarantine_key_read_once_per_worker_and_replays_open_every_day(tmp_path, keys):
    """What names no subject is sealed under the quarantine key of its received_at's UTC day, which
    a worker reads from the keystore once; redrive and backfill open each record by its key id."""
    from event_delivery.contract.dead_letters import DEAD_LETTER_SCHEMA, ErrorKind, dead_letter, quarantine_key_name
    from pipelines.redrive import ReplayDeadLettersFn
    from transforms.archive import ReplayArchiveFn, SealRawMessagesFn, parsed_raw_archive_schema
    from transforms.sealed_dead_letters import SealDeadLettersFn
    from transforms.sealing import JobKeyCache

    search = load_registry()["search"]
    day = 86_400_000
    stamps = {"d1-a": 5 * day + 1000, "d1-b": 6 * day - 1, "d2-a": 6 * day, "d2-b": 6 * day + 5000}
    key_cache = JobKeyCache(keys, search.name)
    cache = key_cache.acquire()
    named, named_key = [], cache.keystore.named_key
    cache.keystore.named_key = lambda name: named.append(name) or named_key(name)

    def dead(event_id):
        return dead_letter("search", ErrorKind.NOT_JSON, "t", event_id, stamps[event_id], {"event_id": event_id}, b"{x")

    seal_dead, seal_raw = SealDeadLettersFn(search, key_cache), SealRawMessagesFn(search, key_cache)
    seal_dead.setup(), seal_raw.setup()
    letters, archived = [], []
    for _ in range(2):  # bundle after bundle: the worker's cache answers
        letters += [r for _, _, r in seal_dead.seal([(i, stamps[i], dead(i)) for i in stamps])]
        archived += [
            r for _, _, r in seal_raw.seal([(i, t, (None, t, {"event_id": i}, b"{x")) for i, t in stamps.items()])
        ]
    day_names = [quarantine_key_name("search", 5 * day), quarantine_key_name("search", 6 * day)]
    assert sorted(named) == day_names, "one keystore call per day, whichever step and bundle asks"
    keystore = keys.open()
    by_day = {name: keystore.named_key(name).key_id for name in day_names}
    assert by_day[day_names[0]] != by_day[day_names[1]]
    for records, field in ((letters, "quarantine_key_id"), (archived, "key_id")):
        assert {r["event_id"]: r[field] for r in records} == {
            i: by_day[quarantine_key_name("search", t)] for i, t in stamps.items()
        }

    dead_file, archive_file = tmp_path / "dead.avro", tmp_path / "raw.avro"
    files.write_avro(str(dead_file), files.fastavro.parse_schema(DEAD_LETTER_SCHEMA), letters[:4])
    files.write_avro(str(archive_file), parsed_raw_archive_schema(), archived[:4])
    redrive = ReplayDeadLettersFn(search, keys, "none")
    redrive.setup()
    replayed = [m for m in redrive.process(str(dead_file)) if not isinstance(m, beam.pvalue.TaggedOutput)]
    assert sorted(m.attributes["event_id"] for m in replayed) == sorted(stamps)
    assert all(m.data == b"{x" for m in replayed)
    backfill = ReplayArchiveFn(search, key_cache)
    backfill.setup()
    assert sorted((m.attributes["event_id"], m.data) for m in backfill.process(str(archive_file))) == sorted(
        (i, b"{x") for i in stamps
    )


def test_sealed_payloads_swapped_between_records_under_one_key_open_in_neither(tmp_path, keys):
    """Two malformed messages of one day share the day's quarantine key. Their sealed payloads swapped
    between the records, in the dead letters and in the raw archive, no longer open: redrive and
    backfill replay neither, rather than one message under the other's id and attributes."""
    from event_delivery.contract.dead_letters import DEAD_LETTER_SCHEMA, ErrorKind, dead_letter
    from pipelines.redrive import ReplayDeadLettersFn
    from transforms.archive import ReplayArchiveFn, SealRawMessagesFn, parsed_raw_archive_schema
    from transforms.sealed_dead_letters import SealDeadLettersFn
    from transforms.sealing import JobKeyCache

    search, received_at = load_registry()["search"], START * 1000
    payloads = {"e1": b'{"user_id": "alice", ', "e2": b'{"user_id": "bob", '}
    attributes = {i: {"event_id": i, "producer_note": f"note of {i}"} for i in payloads}
    key_cache = JobKeyCache(keys, search.name)
    seal_dead, seal_raw = SealDeadLettersFn(search, key_cache), SealRawMessagesFn(search, key_cache)
    seal_dead.setup(), seal_raw.setup()
    letters = [
        r
        for _, _, r in seal_dead.seal(
            [
                (i, received_at, dead_letter("search", ErrorKind.NOT_JSON, "t", i, received_at, attributes[i], p))
                for i, p in payloads.items()
            ]
        )
    ]
    archived = [
        r
        for _, _, r in seal_raw.seal(
            [(i, received_at, (None, received_at, attributes[i], p)) for i, p in payloads.items()]
        )
    ]
    assert len({r["quarantine_key_id"] for r in letters} | {r["key_id"] for r in archived}) == 1, "one key"

    def swapped(records):
        first, second = records
        return [{**first, "payload": second["payload"]}, {**second, "payload": first["payload"]}]

    redrive = ReplayDeadLettersFn(search, keys, "none")
    redrive.setup()
    backfill = ReplayArchiveFn(search, key_cache)
    backfill.setup()
    for name, records in (("as sealed", letters), ("swapped", swapped(letters))):
        path = tmp_path / f"dead-{name}.avro"
        files.write_avro(str(path), files.fastavro.parse_schema(DEAD_LETTER_SCHEMA), records)
        replayed = {m.attributes["event_id"]: m.data for m in redrive.process(str(path)) if hasattr(m, "data")}
        assert replayed == (payloads if name == "as sealed" else {}), f"redrive of the dead letters {name}"
    for name, records in (("as sealed", archived), ("swapped", swapped(archived))):
        path = tmp_path / f"raw-{name}.avro"
        files.write_avro(str(path), parsed_raw_archive_schema(), records)
        replayed = {m.attributes["event_id"]: m.data for m in backfill.process(str(path))}
        assert replayed == (payloads if name == "as sealed" else {}), f"backfill of the archive {name}"


def test_the_raw_archive_retention_is_the_one_forgets_guarantees_name():
    """The archive's retention is a setting of the layout, and docs/privacy.md states it where it says
    what forget erases and within what bound: a change to either without the other fails here."""
    import re

    from event_delivery.contract.partitions import RAW_ARCHIVE_RETENTION_DAYS

    text = (pathlib.Path(__file__).parents[2] / "docs" / "privacy.md").read_text()
    guarantees = text[text.index("## For the data-protection officer") :]
    guarantees = guarantees[: guarantees.index("\n## ")]
    stated = re.compile(r"`RAW_ARCHIVE_RETENTION_DAYS`\s+\((\d+) days")
    assert stated.search(guarantees), "forget's guarantees name the raw archive's retention"
    assert {int(days) for days in stated.findall(text)} == {RAW_ARCHIVE_RETENTION_DAYS}


def test_broken_messages_of_forgotten_and_unknown_subjects_leak_into_no_file_or_log(tmp_path, keys, caplog):
    """After a forget, the forgotten subject's messages reach branches that its earlier events did not:
    every way of being malformed (dead letters and the raw archive), valid ones on time and late
    (delivered and late, with null fields; archived without payload), each with its subject id in an
    attribute of the producer's own too. So do the broken messages of a subject never seen. No byte
    of any output file, of the keystore or of the logs holds any of their clear values."""
    caplog.set_level(logging.DEBUG)
    search = load_registry()["search"]
    settings = settings_for(tmp_path, search, keys)
    forgotten, stranger = "LEAKMARKforgottenZ", "LEAKMARKstrangerZ"
    planted = [forgotten, stranger]
    ids = {forgotten: "f", stranger: "s"}  # event ids are in clear: they must not name the subject

    def fields_of(subject: str, n: int) -> dict:
        planted.append(f"LEAKMARK{subject}query{n}Z")
        return {**valid_fields(search, n), "user_id": subject, "query": planted[-1]}

    def valid(subject: str, n: int):
        return message(fields_of(subject, n), f"{ids[subject]}-{n}", (START + 3601) * 1000, producer_user=subject)

    def broken(subject: str, n: int) -> list:
        fields, limit = fields_of(subject, n), settings.max_event_bytes
        return malformed_messages(search, fields, f"{ids[subject]}-{n}", limit, producer_user=subject)

    deliver_events(settings, [(f"before-{n}", fields_of(forgotten, n)) for n in range(2)])
    assert keys.open().forget(forgotten)

    on_time = [valid(forgotten, 10), *broken(forgotten, 11), *broken(stranger, 12)]
    later = dataclasses.replace(settings, run_id="run2")
    deliver_events(later, on_time, start=START + 3600, late_events=[valid(forgotten, 13), *broken(forgotten, 14)])

    outputs = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    for kind in ("_SUCCESS", "/late/", "/dead-letter/", "/delivered/", "/raw/"):
        assert any(kind in str(p) for p in outputs), f"the scan covers {kind}"
    dead = [r for p in outputs if "/dead-letter/" in str(p) and p.suffix == ".avro" for r in files.read_avro(str(p))]
    assert len(dead) == 3 * len(broken(stranger, 0)), "every broken message is dead-lettered"
    assert {r["error_kind"] for r in dead} >= {"SCHEMA_VIOLATION", "NOT_JSON", "TOO_LARGE", "BAD_TIMESTAMP"}
    late = [r for p in outputs if "/late/" in str(p) and p.suffix == ".avro" for r in files.read_avro(str(p))]
    assert [(r["event_id"], r["user_id"], r["query"]) for r in late] == [("f-13", None, None)]

    blobs = {str(p): _readable_bytes(p) for p in outputs}
    blobs["keystore"] = b"".join(_read_if_present(p) for p in tmp_path.glob("keystore.db*"))
    blobs["captured logs"] = caplog.text.encode()
    leaks = [
        (marker, where)
        for marker in planted
        for where, blob in blobs.items()
        if any(form in blob for form in _leak_forms(marker))
    ]
    assert not leaks

"""Redrive: fixed dead letters replay through the delivery path, and the counts still balance."""

from __future__ import annotations

import json
import time

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from event_delivery.cloud import files
from event_delivery.contract.dead_letters import DEAD_LETTER_SCHEMA, ErrorKind, dead_letter, quarantine_key_name
from event_delivery.contract.fixes import FIXES, strip_unknown_fields
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import load_registry
from event_delivery.keys.fields import encrypt_bytes
from pipelines import redrive
from pipelines.delivery import deliver
from tests.messages import message, raw_message, valid_fields
from tests.streams import LATENESS, START, TRIGGER, WINDOW, Clock, local_keys, local_settings, streaming_pipeline
from tools.ops.audit import audit_type


def setup(tmp_path):
    search = load_registry()["search"]
    settings = local_settings(tmp_path, search, local_keys(tmp_path))
    key_flags = [f"--keystore=sqlite:///{tmp_path}/keystore.db", f"--local_key_file={tmp_path}/kek.key"]
    layout = [f"--window_seconds={WINDOW}", f"--allowed_lateness_seconds={LATENESS}"]
    return search, settings, key_flags + layout


def counts(tmp_path):
    audit = audit_type(Layout.under(tmp_path, "search", WINDOW))
    assert not audit.problems
    return {kind: audit.total(kind) for kind in ("delivered", "duplicates", "late", "dead_lettered")}


def test_fixed_dead_letters_of_a_closed_hour_are_delivered_late(tmp_path):
    search, settings, flags = setup(tmp_path)
    ahead_of_schema = [{**valid_fields(search, i), "new_field": "x"} for i in range(3)]
    clock = Clock(START)
    clock.arrive(*(message(valid_fields(search, i), f"ok{i}", (START + 1) * 1000) for i in range(5)))
    clock.arrive(*(message(f, f"ahead{i}", (START + 2) * 1000) for i, f in enumerate(ahead_of_schema)))
    clock.arrive(raw_message(b"{broken", "broken"))
    clock.advance(WINDOW + LATENESS + TRIGGER)
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), settings)
    before = counts(tmp_path)
    assert before == {"delivered": 5, "duplicates": 0, "late": 0, "dead_lettered": 4}

    args = ["--event_type=search", f"--storage_root={tmp_path}", "--start=1970-01-01T00", "--end=1970-01-02T00"]
    assert redrive.main([*args, "--fix=strip_unknown_fields", *flags]) == 0
    after = counts(tmp_path)
    assert after == {"delivered": 5, "duplicates": 0, "late": 3, "dead_lettered": 1}
    assert sum(after.values()) == sum(before.values())
    late = [r for p in files.glob(f"{tmp_path}/late/search/*/*/*.avro") for r in files.read_avro(p)]
    assert sorted(r["event_id"] for r in late) == ["ahead0", "ahead1", "ahead2"]
    assert all(r["key_id"] and isinstance(r["query"], bytes) for r in late), "redriven events are encrypted too"

    assert redrive.main([*args, "--fix=strip_unknown_fields", *flags]) == 0
    assert counts(tmp_path) == after, "a second redrive finds nothing more to do"


def test_dead_letters_of_an_open_hour_are_staged_for_its_close(tmp_path):
    search, settings, flags = setup(tmp_path)
    # The next window: open for at least WINDOW + LATENESS seconds from now, however long
    # the redrive takes, since the redrive routes an hour by its marker or its close time.
    now = int(time.time())
    hour = now - now % WINDOW + WINDOW
    keystore = settings.keys.open()
    key = keystore.named_key(quarantine_key_name("search", hour * 1000))
    payload = json.dumps(valid_fields(search, 1)).encode()
    record = dead_letter("search", ErrorKind.BAD_TIMESTAMP, "test", "e1", hour * 1000, {"event_id": "e1"}, payload)
    record.update(
        payload=encrypt_bytes(key.aead, payload, "search", "payload", key.key_id, "e1"), quarantine_key_id=key.key_id
    )
    folder = settings.layout.hour(settings.layout.dead_letter, hour)
    files.write_avro(
        f"{folder}/search-run1-p00000-s000.avro", files.fastavro.parse_schema(DEAD_LETTER_SCHEMA), [record]
    )

    day = time.strftime("%Y-%m-%dT00", time.gmtime(now))
    assert (
        redrive.main(
            ["--event_type=search", f"--storage_root={tmp_path}", f"--start={day}", "--end=2100-01-01T00", *flags]
        )
        == 0
    )
    staged = files.glob(f"{tmp_path}/delivered/_staging/search/*/*/*.avro")
    assert [r["event_id"] for p in staged for r in files.read_avro(p)] == ["e1"]
    assert not files.glob(f"{tmp_path}/dead-letter/search/*/*/*.avro")


def test_a_malformed_dead_letter_naming_a_subject_is_quarantined_and_redriven_after_a_forget_as_null(tmp_path):
    """A message that fails validation names its subject unvouched for: its dead letter and its
    archived copy are sealed under the day's quarantine key, and no subject key is made for it.
    Forget therefore does not erase it (the quarantine retention does); redriven after the
    forget, it is delivered with the forgotten subject's personal fields null."""
    search, _, flags = setup(tmp_path)
    settings = local_settings(tmp_path, search, local_keys(tmp_path), raw_archive=True)
    alice = {**valid_fields(search, 1), "user_id": "alice", "new_field": "x"}
    bob = {**valid_fields(search, 2), "user_id": "bob", "new_field": "x"}
    clock = Clock(START)
    clock.arrive(message(alice, "a1", (START + 1) * 1000), message(bob, "b1", (START + 1) * 1000))
    clock.advance(WINDOW + LATENESS + TRIGGER)
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), settings)

    keystore = settings.keys.open()
    assert keystore.subject_key_ids(["alice", "bob"], create=False, scope=search.name) == {"alice": None, "bob": None}
    quarantine = keystore.named_key(quarantine_key_name("search", (START + 1) * 1000)).key_id
    dead = {
        r["event_id"]: r for p in files.glob(f"{tmp_path}/dead-letter/search/*/*/*.avro") for r in files.read_avro(p)
    }
    assert {i: r["quarantine_key_id"] for i, r in dead.items()} == {"a1": quarantine, "b1": quarantine}
    archived = {r["event_id"]: r for p in files.glob(f"{tmp_path}/raw/search/*/*/*.avro") for r in files.read_avro(p)}
    assert {i: r["key_id"] for i, r in archived.items()} == {"a1": quarantine, "b1": quarantine}

    keystore.forget("alice")
    args = ["--event_type=search", f"--storage_root={tmp_path}", "--start=1970-01-01T00", "--end=1970-01-02T00"]
    assert redrive.main([*args, "--fix=strip_unknown_fields", *flags]) == 0
    late = {r["event_id"]: r for p in files.glob(f"{tmp_path}/late/search/*/*/*.avro") for r in files.read_avro(p)}
    assert sorted(late) == ["a1", "b1"]
    assert late["a1"]["key_id"] is None and late["a1"]["user_id"] is None and late["a1"]["query"] is None
    assert late["b1"]["key_id"] and isinstance(late["b1"]["user_id"], bytes)


def _sealed_dead_letters(keys, payloads: dict[str, bytes]) -> list[dict]:
    """NOT_JSON dead letters of ``search`` as the delivery job seals them, under the quarantine key."""
    key = keys.open().named_key(quarantine_key_name("search", START * 1000))
    records = []
    for event_id, payload in payloads.items():
        record = dead_letter("search", ErrorKind.NOT_JSON, "t", event_id, START * 1000, {"event_id": event_id}, payload)
        sealed = encrypt_bytes(key.aead, payload, "search", "payload", key.key_id, event_id)
        records.append({**record, "payload": sealed, "quarantine_key_id": key.key_id})
    return records


def _altered(sealed: bytes) -> bytes:
    return sealed[:-1] + bytes([sealed[-1] ^ 1])


def test_a_dead_letter_the_fix_or_its_unsealing_cannot_handle_stays_counted_and_the_rest_replay(tmp_path, monkeypatch):
    """Each message of a dead-letter file is replayed on its own: one the fix raises on, or whose
    sealed payload no longer opens, stays where it is, counted, instead of failing the file's
    bundle, and with it the whole redrive, every time. A payload nested too deeply to decode is
    left as it is by ``strip_unknown_fields``, and parsing dead-letters it again."""
    search, keys = load_registry()["search"], local_keys(tmp_path)
    ahead = json.dumps({**valid_fields(search, 1), "new_field": 1}).encode()
    records = _sealed_dead_letters(keys, {"ahead": ahead, "nested": b"[" * 100_000, "altered": ahead, "odd": b"{}"})
    records[2]["payload"] = _altered(records[2]["payload"])
    path = str(tmp_path / "dead-letters.avro")
    files.write_avro(path, files.fastavro.parse_schema(DEAD_LETTER_SCHEMA), records)

    def strip_unknown_fields_but_not_odd_ones(data, attributes, event_type):
        if data == b"{}":
            raise RuntimeError("a fix with a bug")
        return strip_unknown_fields(data, attributes, event_type)

    monkeypatch.setitem(FIXES, "strip_unknown_fields_but_not_odd_ones", strip_unknown_fields_but_not_odd_ones)
    pipeline = TestPipeline()
    replayed = (
        pipeline
        | beam.Create([path])
        | beam.ParDo(redrive.ReplayDeadLettersFn(search, keys, "strip_unknown_fields_but_not_odd_ones")).with_outputs(
            redrive.REPLAYED, main="messages"
        )
    )
    ids = replayed.messages | beam.Map(lambda m: m.attributes["event_id"])
    assert_that(ids, equal_to(["ahead", "nested"]))
    result = pipeline.run()
    result.wait_until_finish()
    query = MetricsFilter().with_namespace("redrive").with_name(redrive.NOT_REPLAYABLE)
    assert sum(c.committed for c in result.metrics().query(query)["counters"]) == 2, "the altered one and the odd one"


def test_a_redrive_replays_an_hour_around_dead_letters_it_cannot_handle_and_keeps_them(tmp_path):
    """``make redrive FIX=strip_unknown_fields`` over an hour that holds a payload nested too deeply
    to decode and a dead letter altered at rest: the fixable one is delivered late, the other two
    stay in the dead letters, and the counts balance."""
    search, settings, flags = setup(tmp_path)
    clock = Clock(START)
    clock.arrive(message(valid_fields(search, 1), "ok", (START + 1) * 1000))
    for event_id in ("ahead", "altered"):
        clock.arrive(message({**valid_fields(search, 2), "new_field": 1}, event_id, (START + 1) * 1000))
    clock.arrive(raw_message(b"[" * 50_000, "nested", received_at=str((START + 1) * 1000)))
    clock.advance(WINDOW + LATENESS + TRIGGER)
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), settings)
    before = counts(tmp_path)
    assert before == {"delivered": 1, "duplicates": 0, "late": 0, "dead_lettered": 3}
    for path in files.glob(f"{tmp_path}/dead-letter/search/*/*/*.avro"):  # one payload altered at rest
        records = files.read_avro(path)
        for record in records:
            if record["event_id"] == "altered":
                record["payload"] = _altered(record["payload"])
        files.write_avro(path, files.fastavro.parse_schema(DEAD_LETTER_SCHEMA), records)

    args = ["--event_type=search", f"--storage_root={tmp_path}", "--start=1970-01-01T00", "--end=1970-01-02T00"]
    assert redrive.main([*args, "--fix=strip_unknown_fields", *flags]) == 0
    after = counts(tmp_path)
    assert after == {"delivered": 1, "duplicates": 0, "late": 1, "dead_lettered": 2}
    remaining = [r for p in files.glob(f"{tmp_path}/dead-letter/search/*/*/*.avro") for r in files.read_avro(p)]
    assert sorted(r["event_id"] for r in remaining) == ["altered", "nested"], "kept, in the rewritten file"

"""Redrive: fixed dead letters replay through the delivery path, and the counts still balance."""

from __future__ import annotations

import json
import time

from event_delivery.cloud import files
from event_delivery.contract.dead_letters import DEAD_LETTER_SCHEMA, ErrorKind, dead_letter, quarantine_key_name
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import load_registry
from event_delivery.keys.fields import encrypt_bytes
from event_delivery.ops.audit import audit_type
from pipelines import redrive
from pipelines.delivery import deliver
from tests.conftest import message, raw_message, valid_fields
from tests.streams import LATENESS, START, TRIGGER, WINDOW, Clock, local_keys, local_settings, streaming_pipeline


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
        payload=encrypt_bytes(key.aead, payload, "search", "payload", key.key_id), quarantine_key_id=key.key_id
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


def test_a_dead_letter_that_names_its_subject_is_erased_by_forget_and_the_rest_still_redrive(tmp_path):
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
    subject_keys = keystore.subject_key_ids(["alice", "bob"], create=False, scope=search.name)
    dead = {
        r["event_id"]: r for p in files.glob(f"{tmp_path}/dead-letter/search/*/*/*.avro") for r in files.read_avro(p)
    }
    assert {i: r["quarantine_key_id"] for i, r in dead.items()} == {
        "a1": subject_keys["alice"],
        "b1": subject_keys["bob"],
    }
    archived = {r["event_id"]: r for p in files.glob(f"{tmp_path}/raw/search/*/*/*.avro") for r in files.read_avro(p)}
    assert {i: r["key_id"] for i, r in archived.items()} == {"a1": subject_keys["alice"], "b1": subject_keys["bob"]}, (
        "the archived copy of a message that fails validation is sealed under the subject it names too"
    )

    keystore.forget("alice")
    assert keystore.data_keys([subject_keys["alice"]]) == {subject_keys["alice"]: None}, (
        "alice's dead letter is sealed for good"
    )

    args = ["--event_type=search", f"--storage_root={tmp_path}", "--start=1970-01-01T00", "--end=1970-01-02T00"]
    assert redrive.main([*args, "--fix=strip_unknown_fields", *flags]) == 0
    late = [r["event_id"] for p in files.glob(f"{tmp_path}/late/search/*/*/*.avro") for r in files.read_avro(p)]
    remaining = [
        r["event_id"] for p in files.glob(f"{tmp_path}/dead-letter/search/*/*/*.avro") for r in files.read_avro(p)
    ]
    assert (late, remaining) == (["b1"], ["a1"]), "bob's is redriven; alice's stays, unreadable"

"""Backfill: the raw archive replays through the delivery path, completely and idempotently."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from event_delivery.cloud import files
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import load_registry
from pipelines import backfill
from pipelines.decrypt import decrypt_record
from pipelines.delivery import deliver
from tests.messages import message, raw_message, valid_fields
from tests.streams import LATENESS, START, TRIGGER, WINDOW, Clock, local_keys, local_settings, streaming_pipeline
from tools.ops.audit import audit_type


def live_run(root, event_type, keys):
    """Streams two hours with duplicates, dead letters and late events, archiving every message."""
    settings = local_settings(f"{root}/live", event_type, keys, raw_archive=True)
    clock = Clock(START)
    first = [message(valid_fields(event_type, i), f"a{i}", (START + i) * 1000) for i in range(12)]
    clock.arrive(*first, first[0], first[3], raw_message(b"{oops", "bad-1"), raw_message(b"", "bad-2"))
    clock.advance(TRIGGER * 2)
    second = [message(valid_fields(event_type, i), f"b{i}", (START + WINDOW + i) * 1000) for i in range(5)]
    clock.arrive(*second, first[5], message({"unknown": 1}, "bad-3", (START + WINDOW) * 1000))
    clock.advance(WINDOW + LATENESS + TRIGGER)  # the first hour closes
    clock.arrive(message(valid_fields(event_type, 99), "late-1", (START + 2) * 1000), first[7])
    clock.advance(WINDOW + TRIGGER)
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), settings)
    return settings


def backfill_flags(root, keys, event_type) -> list[str]:
    return [
        f"--event_type={event_type.name}",
        f"--raw_archive_root={root}/live/raw",
        f"--storage_root={root}/backfill",
        "--start=1970-01-01T00",
        "--end=1970-01-02T00",
        f"--window_seconds={WINDOW}",
        f"--allowed_lateness_seconds={LATENESS}",
        "--late_horizon_seconds=86400",
        "--num_shards=2",
        f"--keystore={keys.keystore}",
        f"--local_key_file={keys.local_key_file}",
    ]


def audit(root, name):
    result = audit_type(Layout.under(root, name, WINDOW))
    assert not result.problems
    return result


def clear_records(root, event_type, keys) -> dict[str, dict]:
    """Delivered and late records under ``root``, decrypted, by event id (a late copy of a
    delivered event, which a live run can produce, collapses into one)."""
    keystore = keys.open()
    records = {}
    for path in files.glob(f"{root}/delivered/{event_type.name}/*/*/*.avro") + files.glob(
        f"{root}/late/{event_type.name}/*/*/*.avro"
    ):
        for record in files.read_avro(path):
            key = keystore.data_keys([record["key_id"]])[record["key_id"]] if record.get("key_id") else None
            clear, failures = decrypt_record(record, event_type, AESGCM(key) if key else None)
            assert not failures
            records[record["event_id"]] = clear
    return records


def manifests(root, name) -> dict[str, dict]:
    return {path[len(root) :]: files.read_json(path) for path in files.glob(f"{root}/delivered/{name}/*/*/_SUCCESS")}


@pytest.mark.parametrize("type_name", ["search", "service_log"])
def test_backfill_redelivers_every_archived_message_and_a_rerun_changes_nothing(tmp_path, type_name):
    event_type, keys = load_registry()[type_name], local_keys(tmp_path)
    live = live_run(tmp_path, event_type, keys)
    streamed = audit(f"{tmp_path}/live", type_name)
    # One late event; the repeat that came after its hour closed is a duplicate, not late.
    assert (streamed.total("late"), streamed.total("dead_lettered")) == (1, 3), "the live run saw late and bad input"

    assert backfill.main(backfill_flags(tmp_path, keys, event_type)) == 0
    once = audit(f"{tmp_path}/backfill", type_name)
    # Against what the live run was sent, not only against the live run (the same code):
    # 25 messages, of which 18 unique ids, 4 repeats (one after its hour closed), 3 bad.
    unique = [f"a{i}" for i in range(12)] + [f"b{i}" for i in range(5)] + ["late-1"]
    assert sorted(i for hour in once.hours.values() for i in hour.delivered_ids) == sorted(unique)
    assert (once.total("duplicates"), once.total("dead_lettered"), once.total("late")) == (4, 3, 0)
    for partition, hour in streamed.hours.items():
        again = once.hours[partition]
        assert again.closed and again.late == 0
        assert again.total == hour.total, f"{partition}: every archived message is accounted for once"
        assert again.dead_lettered == hour.dead_lettered
        assert again.dead_letter_kinds == hour.dead_letter_kinds
    live_records = clear_records(f"{tmp_path}/live", event_type, keys)
    assert clear_records(f"{tmp_path}/backfill", event_type, keys) == live_records
    assert live.layout.raw_archive and files.glob(f"{live.layout.raw_archive}/{type_name}/*/*/*.avro")

    first_manifests = manifests(f"{tmp_path}/backfill", type_name)
    first_files = sorted(p[len(str(tmp_path)) :] for p in files.glob(f"{tmp_path}/backfill/**"))
    assert backfill.main(backfill_flags(tmp_path, keys, event_type)) == 0
    assert manifests(f"{tmp_path}/backfill", type_name) == first_manifests
    assert sorted(p[len(str(tmp_path)) :] for p in files.glob(f"{tmp_path}/backfill/**")) == first_files
    assert clear_records(f"{tmp_path}/backfill", event_type, keys) == live_records


def test_a_forgotten_subjects_archived_messages_are_erased_from_backfills(tmp_path, capsys):
    search, keys = load_registry()["search"], local_keys(tmp_path)
    live_run(tmp_path, search, keys)
    victim = valid_fields(search, 2)[search.subject_field]
    victim_ids = {i for i, r in clear_records(f"{tmp_path}/live", search, keys).items() if r["user_id"] == victim}
    assert victim_ids
    keys.open().forget(victim)

    assert backfill.main(backfill_flags(tmp_path, keys, search)) == 0
    records = clear_records(f"{tmp_path}/backfill", search, keys)
    assert victim_ids.isdisjoint(records), "nothing of the forgotten subject comes back"
    assert records, "other subjects are still backfilled"
    summary = capsys.readouterr().out
    assert "erased (subject forgotten)" in summary
    erased = int(summary.split(" erased")[0].rsplit(" ", 1)[1])
    assert erased >= len(victim_ids)
    raw = [r for p in files.glob(f"{tmp_path}/live/raw/search/*/*/*.avro") for r in files.read_avro(p)]
    assert all(r["key_id"] and r["payload"] and b"user_id" not in r["payload"] for r in raw), "archived sealed"

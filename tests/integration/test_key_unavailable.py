"""No bundle fails forever on one subject's key: a key the keystore cannot give, for good, sends
that subject's events to the dead letters (kind ``key_unavailable``, sealed under the quarantine
key) and every other subject's events are delivered; a transient keystore error is retried.

On Dataflow a streaming bundle that keeps failing is retried without end and stalls the type;
these tests break one subject's wrapped key in a real SQLite keystore, as an altered row, a
format this code does not read or a destroyed KEK version would, on the local runner.
"""

from __future__ import annotations

import io
import json
import sqlite3

import fastavro
import pytest
from google.api_core import exceptions as google_errors

from event_delivery.cloud import files
from event_delivery.contract import envelope
from event_delivery.contract.dead_letters import DEAD_LETTER_SCHEMA, ErrorKind, quarantine_key_name
from event_delivery.contract.partitions import Layout
from event_delivery.keys import kek
from event_delivery.keys.fields import decrypt_bytes
from event_delivery.keys.sqlite import SqliteKeystore
from pipelines import redrive
from pipelines.delivery import deliver
from tests.messages import message, valid_fields
from tests.streams import LATENESS, START, TRIGGER, WINDOW, Clock, local_keys, local_settings, streaming_pipeline
from tools.ops.audit import audit_type
from transforms import retries

SUBJECTS = ["alice", "bob", "carol", "dave", "erin", "frank"]
BROKEN = "alice"
RECEIVED_AT = (START + 1) * 1000
# Each a way a wrapped key stops unwrapping for good, and the error the keystore then raises.
CORRUPTIONS = {
    "altered": lambda wrapped: wrapped[:-1] + bytes([wrapped[-1] ^ 1]),  # InvalidTag
    "unknown format": lambda wrapped: bytes([9]) + wrapped[1:],  # UnknownWrappedFormat
    "destroyed KEK version": lambda wrapped: kek.HEADER.pack(kek.WRAPPED_FORMAT, 99) + wrapped[5:],  # KeysNotFound
}


@pytest.fixture
def search(registry):
    return registry["search"]


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    monkeypatch.setattr(retries, "sleep", lambda seconds: None)


def events(search) -> dict[str, dict]:
    """Two events per subject, in one batch: event id -> fields."""
    return {
        f"{subject}-{n}": {**valid_fields(search, 2 * i + n), "user_id": subject}
        for i, subject in enumerate(SUBJECTS)
        for n in range(2)
    }


def break_key(keys, subject: str, corrupt) -> tuple[str, bytes]:
    """Alters the subject's wrapped key in the SQLite row; returns ``(key id, the row as it was)``."""
    key_id = keys.open().subject_key_ids([subject], scope="search")[subject]
    with sqlite3.connect(keys.keystore.removeprefix("sqlite:///")) as db:
        [(wrapped,)] = db.execute("SELECT wrapped FROM data_keys WHERE key_id = ?", (key_id,)).fetchall()
        db.execute("UPDATE data_keys SET wrapped = ? WHERE key_id = ?", (corrupt(wrapped), key_id))
    return key_id, wrapped


def mend_key(keys, key_id: str, wrapped: bytes) -> None:
    with sqlite3.connect(keys.keystore.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE data_keys SET wrapped = ? WHERE key_id = ?", (wrapped, key_id))


def deliver_one_hour(tmp_path, search, keys, arriving: dict[str, dict], *more):
    settings = local_settings(tmp_path, search, keys, raw_archive=True)
    clock = Clock(START)
    clock.arrive(*(message(fields, event_id, RECEIVED_AT) for event_id, fields in arriving.items()), *more)
    clock.advance(WINDOW + LATENESS + TRIGGER)
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), settings)
    [hour] = audit_type(Layout.under(tmp_path, "search", WINDOW)).hours.values()
    return hour


def read_all(tmp_path, root: str) -> list[dict]:
    return [r for p in files.glob(f"{tmp_path}/{root}/search/*/*/*.avro") for r in files.read_avro(p)]


def redrive_all(tmp_path) -> int:
    flags = [f"--keystore=sqlite:///{tmp_path}/keystore.db", f"--local_key_file={tmp_path}/kek.key"]
    window = [f"--window_seconds={WINDOW}", f"--allowed_lateness_seconds={LATENESS}"]
    span = ["--event_type=search", f"--storage_root={tmp_path}", "--start=1970-01-01T00", "--end=1970-01-02T00"]
    return redrive.main([*span, "--fix=none", *flags, *window])


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_subject_whose_key_does_not_unwrap_is_dead_lettered_and_every_other_subject_is_delivered(
    tmp_path, search, corruption
):
    keys = local_keys(tmp_path)
    keys.open().subject_key_ids(SUBJECTS, scope="search")  # every subject has a key; one of them then breaks
    break_key(keys, BROKEN, CORRUPTIONS[corruption])
    arriving = events(search)
    ahead_of_schema = message({**valid_fields(search, 99), "user_id": BROKEN, "new_field": 1}, "ahead", RECEIVED_AT)
    hour = deliver_one_hour(tmp_path, search, keys, arriving, ahead_of_schema)

    broken = sorted(i for i in arriving if i.startswith(BROKEN))
    assert sorted(hour.delivered_ids) == sorted(set(arriving) - set(broken)), "the other subjects' events pass"
    assert hour.closed and hour.dead_letter_kinds == {"key_unavailable": len(broken), "schema_violation": 1}
    dead = {r["event_id"]: r for r in read_all(tmp_path, "dead-letter")}
    assert sorted(hour.delivered_ids + list(dead)) == sorted([*arriving, "ahead"]), "in = delivered + dead-lettered"
    assert sorted(i for i, r in dead.items() if r["error_kind"] == "KEY_UNAVAILABLE") == broken
    assert all(BROKEN not in r["error_detail"] for r in dead.values()), "the detail names no value"

    keystore = keys.open()
    quarantine = keystore.named_key(quarantine_key_name("search", RECEIVED_AT))
    assert {r["quarantine_key_id"] for r in dead.values()} == {quarantine.key_id}, "never under the broken key"
    for event_id in broken:  # the message as it arrived, for a redrive
        sealed, key_id = dead[event_id]["payload"], quarantine.key_id
        payload = decrypt_bytes(quarantine.aead, sealed, "search", "payload", key_id, event_id)
        assert json.loads(payload) == arriving[event_id]
        assert dead[event_id]["attributes"][envelope.EVENT_ID] == event_id

    archived = {r["event_id"]: r["key_id"] for r in read_all(tmp_path, "raw")}
    subject_keys = keystore.subject_key_ids(SUBJECTS, create=False, scope="search")
    assert archived == {
        **{i: subject_keys[fields["user_id"]] for i, fields in arriving.items()},
        **{i: quarantine.key_id for i in [*broken, "ahead"]},
    }, "the archive seals a broken key's messages under the quarantine key, the rest under their subject's"


def test_redrive_puts_them_back_as_key_unavailable_while_the_key_is_broken_and_delivers_them_once_mended(
    tmp_path, search
):
    keys = local_keys(tmp_path)
    keys.open().subject_key_ids(SUBJECTS, scope="search")
    key_id, wrapped = break_key(keys, BROKEN, CORRUPTIONS["altered"])
    arriving = events(search)
    deliver_one_hour(tmp_path, search, keys, arriving)
    broken = sorted(i for i in arriving if i.startswith(BROKEN))
    assert sorted(r["event_id"] for r in read_all(tmp_path, "dead-letter")) == broken

    assert redrive_all(tmp_path) == 0
    still = read_all(tmp_path, "dead-letter")
    assert sorted(r["event_id"] for r in still) == broken, "not lost, not doubled"
    assert {r["error_kind"] for r in still} == {"KEY_UNAVAILABLE"}
    assert not read_all(tmp_path, "late") and not files.glob(f"{tmp_path}/delivered/_staging/search/*/*/*.avro")

    mend_key(keys, key_id, wrapped)
    assert redrive_all(tmp_path) == 0
    late = read_all(tmp_path, "late")
    assert sorted(r["event_id"] for r in late) == broken, "once the key is mended, they are delivered"
    assert {r["key_id"] for r in late} == {key_id}
    assert not read_all(tmp_path, "dead-letter")


def fail_reads(monkeypatch, error: Exception, times: int | None = None, of_key: str | None = None) -> list:
    """The keystore's reads of wrapped keys (of ``of_key``, or any) raise ``error`` (``times`` times, or always)."""
    real, failures = SqliteKeystore._read_wrapped_keys, []

    def read_wrapped_keys(self, key_ids):
        if (of_key is None or of_key in key_ids) and (times is None or len(failures) < times):
            failures.append(key_ids)
            raise error
        return real(self, key_ids)

    monkeypatch.setattr(SqliteKeystore, "_read_wrapped_keys", read_wrapped_keys)
    return failures


def test_a_transient_keystore_error_is_retried_and_loses_nothing(tmp_path, search, monkeypatch, caplog):
    keys = local_keys(tmp_path)
    failures = fail_reads(monkeypatch, google_errors.ServiceUnavailable("busy"), times=retries.ATTEMPTS - 1)
    arriving = events(search)
    hour = deliver_one_hour(tmp_path, search, keys, arriving)

    assert len(failures) == retries.ATTEMPTS - 1
    assert "busy" not in caplog.text, "retried in the bundle: the runner never saw it fail"
    assert sorted(hour.delivered_ids) == sorted(arriving)
    assert hour.dead_lettered == 0


def test_a_transient_keystore_error_that_does_not_end_fails_the_bundle_and_gives_up_nothing(
    tmp_path, search, monkeypatch
):
    keys = local_keys(tmp_path)
    key_id = keys.open().subject_key_ids([BROKEN], scope="search")[BROKEN]
    failures = fail_reads(monkeypatch, google_errors.DeadlineExceeded("down"), of_key=key_id)
    with pytest.raises(Exception, match="down"):
        deliver_one_hour(tmp_path, search, keys, events(search))
    assert len(failures) >= retries.ATTEMPTS, "tried again before it is left to the runner"
    assert not read_all(tmp_path, "dead-letter"), "left to the runner, which retries the bundle"


def test_dead_letter_files_written_before_key_unavailable_existed_still_read():
    kinds = DEAD_LETTER_SCHEMA["fields"][3]["type"]
    assert kinds["symbols"][-1] == ErrorKind.KEY_UNAVAILABLE.name, "a new kind goes last"
    before = json.loads(json.dumps(DEAD_LETTER_SCHEMA))
    before["fields"][3]["type"]["symbols"] = kinds["symbols"][:-1]
    record = {
        "event_id": "e1",
        "received_at": RECEIVED_AT,
        "event_type": "search",
        "error_kind": "WRITE_FAILED",
        "error_detail": "d",
        "attributes": {},
        "payload": b"sealed",
    }
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(before), [record])
    buffer.seek(0)
    [read] = fastavro.reader(buffer, reader_schema=fastavro.parse_schema(DEAD_LETTER_SCHEMA))
    assert read["error_kind"] == "WRITE_FAILED"

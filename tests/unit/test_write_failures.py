"""No pane is retried forever: a write that fails for good sends its events to the dead
letters (kind ``write_failed``) and the job goes on; a transient failure is retried. Nor
is a close: one denied for good is tried again on a timer.

On Dataflow a streaming bundle that keeps failing is retried without end and stalls
the type; these tests make the writes fail on purpose, as a denied bucket or a record
the schema does not take would, on the local runner.
"""

from __future__ import annotations

import collections

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import FixedWindows, GlobalWindow, TimestampedValue
from google.api_core import exceptions as google_errors

from event_delivery.cloud import files
from event_delivery.contract.dead_letters import ErrorKind, dead_letter
from event_delivery.contract.partitions import Layout
from pipelines import redrive
from pipelines.delivery import deliver
from tests.messages import forgotten_event, message, raw_message, valid_fields
from tests.streams import LATENESS, START, TRIGGER, WINDOW, Clock, local_keys, local_settings, streaming_pipeline
from tools.ops.audit import audit_type
from transforms import close, publish, records, retries
from transforms.late import WriteLatePanes
from transforms.parse import ParseEvents
from transforms.reports import DELIVERED
from transforms.sealing import JobKeyCache
from transforms.write import WriteAvroPanesOrGiveUp

IDS = [f"e{i}" for i in range(6)]


@pytest.fixture
def search(registry):
    return registry["search"]


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch):
    monkeypatch.setattr(retries, "sleep", lambda seconds: None)


def deliver_one_hour(tmp_path, search):
    settings = local_settings(tmp_path, search, local_keys(tmp_path))
    clock = Clock(START)
    clock.arrive(*(message(valid_fields(search, i), event_id, (START + 1) * 1000) for i, event_id in enumerate(IDS)))
    clock.arrive(raw_message(b"{broken", "broken"))
    clock.advance(WINDOW + LATENESS + TRIGGER)
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), settings)
    return audit_type(Layout.under(tmp_path, "search", WINDOW))


def dead_letters(tmp_path) -> list[dict]:
    return [r for p in files.glob(f"{tmp_path}/dead-letter/search/*/*/*.avro") for r in files.read_avro(p)]


def fail_writes_under(folder: str, error: Exception, times: int | None = None):
    """``files.write_encoded_avro`` that raises ``error`` for paths under ``folder`` (``times`` times, or always)."""
    real, failures = files.write_encoded_avro, []

    def write_encoded_avro(path, schema, records, codec=files.AVRO_CODEC, header=None):
        if f"/{folder}/" in path and (times is None or len(failures) < times):
            failures.append(path)
            raise error
        return real(path, schema, records, codec, header)

    return write_encoded_avro, failures


def test_a_denied_write_sends_its_events_to_the_dead_letters_and_redrive_brings_them_back(
    tmp_path, search, monkeypatch
):
    working = files.write_encoded_avro
    denied, failures = fail_writes_under("_staging", google_errors.Forbidden("denied"))
    monkeypatch.setattr(files, "write_encoded_avro", denied)
    hour = deliver_one_hour(tmp_path, search).hours
    [(partition, audited)] = hour.items()

    assert failures, "the staging writes were attempted"
    assert (audited.delivered, audited.dead_lettered, audited.closed) == (0, len(IDS) + 1, True)
    assert audited.dead_letter_kinds == {"write_failed": len(IDS), "not_json": 1}
    failed = [r for r in dead_letters(tmp_path) if r["error_kind"] == "WRITE_FAILED"]
    assert sorted(r["event_id"] for r in failed) == IDS
    assert all(r["payload"] and r["quarantine_key_id"] for r in failed), "sealed like any dead letter"

    monkeypatch.setattr(files, "write_encoded_avro", working)  # the bucket is fixed; the dead letters are redriven
    flags = [f"--keystore=sqlite:///{tmp_path}/keystore.db", f"--local_key_file={tmp_path}/kek.key"]
    window = [f"--window_seconds={WINDOW}", f"--allowed_lateness_seconds={LATENESS}"]
    span = ["--event_type=search", f"--storage_root={tmp_path}", "--start=1970-01-01T00", "--end=1970-01-02T00"]
    assert redrive.main([*span, "--fix=none", *flags, *window]) == 0
    after = audit_type(Layout.under(tmp_path, "search", WINDOW)).hours[partition]
    late = [r for p in files.glob(f"{tmp_path}/late/search/*/*/*.avro") for r in files.read_avro(p)]
    assert sorted(r["event_id"] for r in late) == IDS, "every failed event is replayed, as it arrived"
    assert all(r["key_id"] and isinstance(r["query"], bytes) for r in late), "and sealed again"
    assert (after.late, after.dead_lettered) == (len(IDS), 1)


def test_a_record_the_schema_does_not_take_goes_alone_to_the_dead_letters(tmp_path, search, monkeypatch):
    as_record = records.event_record

    def corrupting(event):
        record = as_record(event)
        return {**record, "received_at": "not a time"} if event[0] == "e3" else record

    monkeypatch.setattr(records, "event_record", corrupting)
    audited = next(iter(deliver_one_hour(tmp_path, search).hours.values()))

    assert (audited.delivered, audited.dead_lettered) == (len(IDS) - 1, 2)
    assert sorted(audited.delivered_ids) == sorted(set(IDS) - {"e3"})
    assert [r["event_id"] for r in dead_letters(tmp_path) if r["error_kind"] == "WRITE_FAILED"] == ["e3"]


def test_a_transient_failure_is_retried_and_loses_nothing(tmp_path, search, monkeypatch):
    flaky, failures = fail_writes_under(
        "_staging", google_errors.ServiceUnavailable("busy"), times=retries.ATTEMPTS - 1
    )
    monkeypatch.setattr(files, "write_encoded_avro", flaky)
    audited = next(iter(deliver_one_hour(tmp_path, search).hours.values()))

    assert len(failures) == retries.ATTEMPTS - 1
    assert (audited.delivered, audited.dead_lettered) == (len(IDS), 1)


def test_a_transient_failure_that_does_not_end_fails_the_bundle_after_a_bounded_number_of_tries(
    tmp_path, search, monkeypatch
):
    down, failures = fail_writes_under("_staging", google_errors.ServiceUnavailable("down"))
    monkeypatch.setattr(files, "write_encoded_avro", down)
    with pytest.raises(Exception, match="down"):
        deliver_one_hour(tmp_path, search)
    # Each try of the bundle (the local runner tries a failed bundle a few times) writes a
    # file ATTEMPTS times, then fails: it is left to the runner, not given up as lost.
    tries = collections.Counter(failures).values()
    assert tries and all(n % retries.ATTEMPTS == 0 for n in tries), tries
    assert not [r for r in dead_letters(tmp_path) if r["error_kind"] == "WRITE_FAILED"], "nor is it given up"


def test_a_close_denied_for_good_is_tried_again_on_a_timer_and_publishes_once_allowed(tmp_path, search, monkeypatch):
    DENIALS = 6  # more than the local runner's tries of a failed bundle: retrying the bundle would not do
    real_write_json, denials = files.write_json, []

    def write_json(path, document):
        if path.endswith(publish.CLOSE_PLAN) and len(denials) < DENIALS:  # mended after some tries
            denials.append(path)
            raise google_errors.Forbidden("denied")
        return real_write_json(path, document)

    monkeypatch.setattr(files, "write_json", write_json)
    closes_at = START - START % WINDOW + WINDOW + LATENESS
    monkeypatch.setattr(close, "wall_clock", lambda: closes_at + TRIGGER)  # the hour is over by the clock
    monkeypatch.setattr(close, "RETRY_CLOSE_SECONDS", TRIGGER)
    settings = local_settings(tmp_path, search, local_keys(tmp_path))
    clock = Clock(START)
    clock.arrive(*(message(valid_fields(search, i), event_id, (START + 1) * 1000) for i, event_id in enumerate(IDS)))
    clock.advance(WINDOW + LATENESS + TRIGGER)  # the close fires, and is denied
    for _ in range(DENIALS + 2):  # processing time passes: the close is tried again
        clock.advance(TRIGGER)
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), settings)

    assert len(denials) == DENIALS, "the job went on after a denied close, and tried again"
    [audited] = audit_type(Layout.under(tmp_path, "search", WINDOW)).hours.values()
    assert (audited.closed, audited.delivered, audited.staged) == (True, len(IDS), 0)


LATE_IDS = IDS[3:]


def deny_the_late_root(monkeypatch) -> list[str]:
    """The job may not write the late root: every late pane's write fails for good."""
    denied, _ = fail_writes_under("late/search", google_errors.Forbidden("denied"))
    monkeypatch.setattr(files, "write_encoded_avro", denied)
    return LATE_IDS


def refuse_a_late_record(monkeypatch) -> list[str]:
    """One late event's record is one the schema does not take: it alone fails."""
    as_record = records.event_record

    def corrupting(event):
        record = as_record(event)
        return {**record, "received_at": "not a time"} if event[0] == "e4" else record

    monkeypatch.setattr(records, "event_record", corrupting)
    return ["e4"]


@pytest.mark.parametrize("fail_for_good", [deny_the_late_root, refuse_a_late_record])
def test_a_late_pane_whose_write_fails_for_good_goes_to_the_dead_letters_and_the_job_goes_on(
    tmp_path, search, monkeypatch, fail_for_good
):
    # One shard: every late event meets the state that saw its hour close, so each goes
    # through WriteLate (none is staged, to be moved to the late root by the close).
    settings = local_settings(tmp_path, search, local_keys(tmp_path), num_shards=1)
    failing = fail_for_good(monkeypatch)
    on_time, next_hour = IDS[:3], ["n0", "n1"]
    clock = Clock(START)
    clock.arrive(*(message(valid_fields(search, i), id_, (START + 1) * 1000) for i, id_ in enumerate(on_time)))
    clock.advance(WINDOW + LATENESS + TRIGGER)  # the first hour closes
    clock.arrive(*(message(valid_fields(search, i), id_, (START + 2) * 1000) for i, id_ in enumerate(LATE_IDS)))
    clock.arrive(*(message(valid_fields(search, i), id_, clock.now * 1000) for i, id_ in enumerate(next_hour)))
    clock.advance(WINDOW + LATENESS + TRIGGER)  # the next hour closes, after the late write failed
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), settings)

    audit = audit_type(settings.layout)
    first, second = (audit.hours[p] for p in sorted(audit.hours))
    written_late = [r["event_id"] for p in files.glob(f"{tmp_path}/late/search/*/*/*.avro") for r in files.read_avro(p)]
    failed = [r for r in dead_letters(tmp_path) if r["error_kind"] == "WRITE_FAILED"]
    assert sorted(r["event_id"] for r in failed) == failing
    assert all(r["payload"] and r["quarantine_key_id"] for r in failed), "sealed like any dead letter"
    assert (first.closed, first.delivered, first.late) == (True, len(on_time), len(LATE_IDS) - len(failing))
    assert (first.dead_lettered, first.dead_letter_kinds) == (len(failing), {"write_failed": len(failing)})
    assert (second.closed, sorted(second.delivered_ids)) == (True, next_hour), "the job went on"
    outcomes = [*first.delivered_ids, *written_late, *(r["event_id"] for r in failed), *second.delivered_ids]
    assert sorted(outcomes) == sorted(IDS + next_hour), "every message in exactly one place"
    assert first.total + second.total == len(IDS + next_hour)


def _shape(dead_letter, window=beam.DoFn.WindowParam):
    """What the dead-letter sink relies on: ``(event_id, received_at_millis, record)`` with the record's
    fields, in the global window (the sink buckets them by hour itself)."""
    event_id, received_at, record = dead_letter
    return type(event_id).__name__, type(received_at).__name__, sorted(record), isinstance(window, GlobalWindow)


def test_every_step_that_can_fail_gives_its_failures_as_dead_letters_of_one_shape(tmp_path, search, monkeypatch):
    """Parsing, staging and the late write each return a ``Result`` whose ``dead_letters`` the delivery
    path sends, as they are, to its one sink: the writes' given-up panes are dead letters already."""
    settings = local_settings(tmp_path, search, local_keys(tmp_path), num_shards=1)
    denied, failures = fail_writes_under(search.name, google_errors.Forbidden("denied"))
    monkeypatch.setattr(files, "write_encoded_avro", denied)
    key_cache = JobKeyCache(settings.keys, search.name)
    pane = ((0, "w"), [forgotten_event(search, "e0", (START + 1) * 1000)])
    record = dead_letter(search.name, ErrorKind.NOT_JSON, "", "x", 0, {}, b"")
    parse_shape = _shape(("x", 0, record), GlobalWindow())
    with TestPipeline() as pipeline:
        panes = (
            pipeline
            | "Panes" >> beam.Create([pane])
            | "InTheHour" >> beam.Map(lambda p: TimestampedValue(p, START + 1))
            | "IntoHours" >> beam.WindowInto(FixedWindows(WINDOW))
        )
        failing = {
            "ParseEvents": pipeline | beam.Create([raw_message(b"{broken", "broken")]) | ParseEvents(settings),
            "StageDelivered": panes
            | "AsDeduplicateNumbersThem" >> beam.Map(lambda pane: ((*pane[0], 0), pane[1]))
            | "Stage" >> WriteAvroPanesOrGiveUp(settings, settings.layout.staging, DELIVERED, key_cache, numbered=True),
            "WriteLate": panes | "Late" >> WriteLatePanes(settings, key_cache),
        }
        for step, result in failing.items():
            assert_that(result.dead_letters | f"{step}Shape" >> beam.Map(_shape), equal_to([parse_shape]), step)
    assert len(failures) == 2, "both writes failed for good"

"""Parsing and validation: every kind of bad input is dead-lettered with its kind, nothing crashes."""

from __future__ import annotations

import gc
import json
import random

import apache_beam as beam
import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from event_delivery.contract.dead_letters import MESSAGE_ERRORS, ErrorKind
from tests.messages import message, published_at, raw_message, valid_fields
from tests.streams import local_keys, local_settings
from tools.local.loadgen import malformed
from transforms import collector
from transforms.parse import DEAD_LETTERS, ParseEventFn, ParseEvents
from transforms.read import StampArrivalFn

ARRIVAL_MILLIS = 1_800_000_000_000
MAX_BYTES = 4096


def parse(event_type, msg, arrival_millis=ARRIVAL_MILLIS):
    """Runs the DoFn on one message: ``("event", element)`` or ``("dead_letter", element)``."""
    fn = ParseEventFn(event_type, MAX_BYTES, late_horizon_seconds=86400, max_future_seconds=3600)
    fn.setup()
    [output] = list(fn.process(published_at(msg, arrival_millis)))
    if isinstance(output, beam.pvalue.TaggedOutput):
        assert output.tag == DEAD_LETTERS
        return "dead_letter", output.value
    return "event", output


def test_a_valid_event_parses_with_defaults_filled(registry):
    play = registry["play"]
    fields = valid_fields(play)
    for optional in ("device_id", "ip_address", "shuffle"):
        fields.pop(optional)
    outcome, (event_id, received_at, record) = parse(play, message(fields, "e-7", ARRIVAL_MILLIS - 5))
    assert outcome == "event"
    assert (event_id, received_at) == ("e-7", ARRIVAL_MILLIS - 5)
    assert record["device_id"] is None and record["shuffle"] is False
    assert set(record) == set(play.field_names)


def test_received_at_accepts_rfc3339_and_defaults_to_arrival(registry):
    play = registry["play"]
    fields = valid_fields(play)
    _, event = parse(play, message(fields, received_at="2027-01-15T08:00:00.250Z"))
    assert event[1] == 1_800_000_000_250  # 2027-01-15T08:00:00.250Z
    _, event = parse(play, message(fields))
    assert event[1] == ARRIVAL_MILLIS


@pytest.mark.parametrize("kind", MESSAGE_ERRORS)
def test_the_load_generator_malformed_messages_get_their_kind(registry, kind):
    for event_type in registry.values():
        data, attributes = malformed(event_type, kind, random.Random(1), ARRIVAL_MILLIS, MAX_BYTES)
        outcome, (_, _, record) = parse(event_type, PubsubMessage(data, attributes))
        assert outcome == "dead_letter"
        assert record["error_kind"] == kind.name, record["error_detail"]
        assert record["payload"] == data and record["attributes"] == attributes


@pytest.mark.parametrize(
    "data, kind",
    [
        (b'{"a": NaN}', ErrorKind.NOT_JSON),
        (b'{"a": 1e999}', ErrorKind.NOT_JSON),
        (b'{"a": 1, "a": 2}', ErrorKind.NOT_JSON),
        (b"[" * 100_000 + b"]" * 100_000, ErrorKind.TOO_LARGE),
        (b"[" * 2000 + b"]" * 2000, ErrorKind.NOT_JSON),
        (b'"just a string"', ErrorKind.NOT_OBJECT),
        (b"null", ErrorKind.NOT_OBJECT),
        (b"\xed\xa0\x80", ErrorKind.NOT_UTF8),  # a UTF-8-encoded surrogate
    ],
)
def test_hostile_payloads(registry, data, kind):
    outcome, (_, _, record) = parse(registry["service_log"], raw_message(data))
    assert outcome == "dead_letter" and record["error_kind"] == kind.name


def test_schema_violations_name_fields_but_never_values(registry):
    search = registry["search"]
    secret = "secret-query-7f3a"
    cases = [
        {**valid_fields(search), "results_count": secret},  # wrong type
        {**valid_fields(search), "user_id": None},  # null where not nullable
        {**valid_fields(search), secret: 1},  # unknown field, named by a value
        {k: v for k, v in {**valid_fields(search), "query": secret}.items() if k != "results_count"},  # missing
        {**valid_fields(search), "query": "\ud800" + secret},  # lone surrogate
        {**valid_fields(search), "results_count": 2**40, "query": secret},  # int out of range
    ]
    for fields in cases:
        data = json.dumps(fields).encode()
        outcome, (_, _, record) = parse(search, raw_message(data))
        assert outcome == "dead_letter" and record["error_kind"] == "SCHEMA_VIOLATION"
        assert secret not in record["error_detail"]


def test_without_any_timestamp_the_hour_is_unknown(registry):
    fn = ParseEventFn(registry["play"], MAX_BYTES, late_horizon_seconds=86400, max_future_seconds=3600)
    fn.setup()
    fields = valid_fields(registry["play"])
    [without] = fn.process(message(fields))
    assert without.value[2]["error_kind"] == "BAD_TIMESTAMP"
    [stamped] = fn.process(message(fields, received_at_millis=123))
    assert stamped[1] == 123, "with no arrival time, received_at is trusted as it is"


def test_timestamps_beyond_the_horizons_are_bad(registry):
    fields = valid_fields(registry["play"])
    day = 86_400_000
    for received_at in (ARRIVAL_MILLIS - 2 * day, ARRIVAL_MILLIS + 2 * 3_600_000, "-5", "1e3", "2026-13-01T00:00:00Z"):
        outcome, (_, dead_letter_received_at, record) = parse(
            registry["play"], message(fields, received_at_millis=received_at)
        )
        assert outcome == "dead_letter" and record["error_kind"] == "BAD_TIMESTAMP"
        assert dead_letter_received_at == ARRIVAL_MILLIS, "a bad timestamp falls back to arrival"


def test_parse_events_transform_splits_events_and_dead_letters(registry, tmp_path):
    log = registry["service_log"]
    good = message(valid_fields(log), "good", ARRIVAL_MILLIS)
    bad = raw_message(b"{", event_id="bad")
    arrived = [published_at(m, ARRIVAL_MILLIS) for m in (good, bad)]
    with TestPipeline() as pipeline:
        settings = local_settings(tmp_path, log, local_keys(tmp_path), max_event_bytes=MAX_BYTES)
        parsed = pipeline | beam.Create(arrived) | ParseEvents(settings)
        assert_that(parsed.output | "Ids" >> beam.Map(lambda e: e[0]), equal_to(["good"]), label="events")
        kinds = parsed.dead_letters | "Kinds" >> beam.Map(lambda d: (d[0], d[2]["error_kind"]))
        assert_that(kinds, equal_to([("bad", "NOT_JSON")]), label="dead_letters")


def test_the_workers_that_parse_run_with_the_collector_tuned_for_streams(registry, tmp_path):
    """Every delivering job parses first: its workers' collector is tuned there (``transforms.collector``)."""
    log = registry["service_log"]
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)  # CPython's defaults, as a fresh worker has them
    try:
        with TestPipeline() as pipeline:
            settings = local_settings(tmp_path, log, local_keys(tmp_path), max_event_bytes=MAX_BYTES)
            arrived = [published_at(message(valid_fields(log), "good", ARRIVAL_MILLIS), ARRIVAL_MILLIS)]
            parsed = pipeline | beam.Create(arrived) | ParseEvents(settings)
            thresholds = parsed.output | beam.Map(lambda _: gc.get_threshold())
            assert_that(thresholds, equal_to([collector.THRESHOLDS]))
    finally:
        gc.set_threshold(*before)


def test_without_publish_time_the_element_timestamp_is_the_arrival(registry, tmp_path):
    """Dataflow's own Pub/Sub reader may leave ``publish_time`` unset; the read then takes the
    element timestamp as the arrival, and parsing bounds ``received_at`` by it."""
    log = registry["service_log"]
    settings = local_settings(tmp_path, log, local_keys(tmp_path), max_event_bytes=MAX_BYTES)
    too_old = ARRIVAL_MILLIS - (settings.late_horizon_seconds + 60) * 1000
    unstamped = message(valid_fields(log), "fresh")
    stale = message(valid_fields(log), "stale", received_at_millis=too_old)
    pipeline = TestPipeline()
    arrived = [beam.window.TimestampedValue(m, ARRIVAL_MILLIS / 1000) for m in (unstamped, stale)]
    parsed = pipeline | beam.Create(arrived) | beam.ParDo(StampArrivalFn()) | ParseEvents(settings)
    events = parsed.output | "Events" >> beam.Map(lambda e: (e[0], e[1]))
    assert_that(events, equal_to([("fresh", ARRIVAL_MILLIS)]), label="events")
    kinds = parsed.dead_letters | "Kinds" >> beam.Map(lambda d: (d[0], d[1], d[2]["error_kind"]))
    assert_that(kinds, equal_to([("stale", ARRIVAL_MILLIS, "BAD_TIMESTAMP")]), label="dead_letters")
    result = pipeline.run()
    result.wait_until_finish()
    query = result.metrics().query(MetricsFilter().with_namespace("delivery").with_name("missing_publish_time"))
    assert sum(counter.committed for counter in query["counters"]) == 2

"""The whole delivery path on a TestStream, writing to local folders.

Event time and processing time advance together, as they do on the DirectRunner
reading Pub/Sub, so hours close exactly when the watermark passes their end plus
the allowed lateness.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import itertools
import json
import pathlib
import random

import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.dead_letters import MESSAGE_ERRORS, ErrorKind, dead_letter, parsed_dead_letter_schema
from event_delivery.contract.registry import load_registry
from pipelines.delivery import deliver
from tests.messages import message, raw_message, valid_fields
from tests.streams import LATENESS, START, TRIGGER, WINDOW, Clock, local_keys, local_settings, streaming_pipeline
from tools.local.loadgen import malformed
from tools.ops.audit import audit_type
from transforms import close, hours
from transforms.hours import shard_of
from transforms.publish import build_manifest


@pytest.fixture
def settings(tmp_path, registry):
    def make(type_name="service_log", run_id="run1"):
        return local_settings(tmp_path, registry[type_name], local_keys(tmp_path), run_id, num_shards=3)

    return make


def run(settings, clock):
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), settings)


def audit(settings):
    return audit_type(settings.layout)


def hour_folder(settings, start_seconds) -> pathlib.Path:
    return pathlib.Path(settings.layout.hour(settings.layout.delivered, start_seconds))


def hour_closes_at(received_at_seconds) -> int:
    """When the watermark closes the hour of an event stamped ``received_at_seconds``."""
    return received_at_seconds - received_at_seconds % WINDOW + WINDOW + LATENESS


def late_ids(settings) -> list[str]:
    """The ids in every late file of the type, one entry per record."""
    paths = files.glob(f"{settings.layout.late}/{settings.event_type.name}/*/*/*.avro")
    return [record["event_id"] for path in paths for record in files.read_avro(path)]


def test_an_hour_is_delivered_deduplicated_and_closed(settings, registry):
    s = settings()
    log = registry["service_log"]
    clock = Clock(START)
    clock.arrive(*(message(valid_fields(log, i), f"e{i}", (START + i) * 1000) for i in range(10)))
    clock.advance(TRIGGER * 2)
    clock.arrive(message(valid_fields(log, 1), "e1", (START + 1) * 1000), raw_message(b"{oops", "bad"))
    clock.advance(TRIGGER * 2)
    clock.arrive(*(message(valid_fields(log, i), f"e{i}", (START + i) * 1000) for i in range(20, 25)))
    clock.advance(WINDOW + LATENESS)
    run(s, clock)

    result = audit(s)
    assert not result.problems
    [hour] = [h for h in result.hours.values() if h.delivered]
    assert hour.closed
    assert sorted(hour.delivered_ids) == sorted([f"e{i}" for i in range(10)] + [f"e{i}" for i in range(20, 25)])
    assert (hour.duplicates, hour.late, hour.dead_lettered) == (1, 0, 1)
    manifest = json.loads((hour_folder(s, START) / "_SUCCESS").read_text())
    assert manifest["accounting"] == {"in": 17, "delivered": 15, "duplicates": 1, "dead_lettered": 1, "forgotten": 0}
    assert manifest["hour_start"] == "1970-01-01T01:00:00Z"
    assert not files.glob(f"{s.layout.staging}/*/*/*/*"), "staging is empty once the hour is published"


def test_panes_split_over_worker_processes_deliver_each_id_once_in_files_of_their_own(settings, registry, monkeypatch):
    """On Dataflow a stream's bundles are read by many worker processes, and each forms its own
    panes of a shard: the key space grows with the job. Here every bundle is packed by the next of
    three simulated processes, and producer retries of an id land with different ones."""
    s = dataclasses.replace(settings(), target_file_mb=0)  # each pane's file a part of its own, by its name
    log = registry["service_log"]
    writers = itertools.cycle(["a1", "b2", "c3"])  # the next for every bundle (of every packing step)
    monkeypatch.setattr(hours, "writer_id", lambda: next(writers))
    clock, sent = Clock(START), []
    for batch in range(6):
        ids = [f"b{batch}-{i}" for i in range(6)]
        retries = [f"b{batch - 1}-{i}" for i in range(3)] if batch else []
        clock.arrive(*(message(valid_fields(log, n), i, (START + 1) * 1000) for n, i in enumerate(ids + retries)))
        clock.advance(TRIGGER * 2)
        sent += ids
    clock.advance(WINDOW + LATENESS)
    run(s, clock)

    result = audit(s)
    assert not result.problems
    hour = result.hours[partitions.partition(START, WINDOW)]
    assert sorted(hour.delivered_ids) == sorted(sent), "each id once, whichever process read its copies"
    assert (hour.duplicates, hour.late) == (15, 0)
    manifest = json.loads((hour_folder(s, START) / "_SUCCESS").read_text())
    names = [pathlib.Path(f["path"]).name for f in manifest["files"]]
    pane_keys = {name.split("-p", 1)[1].split("-", 1)[1] for name in names}  # "s001-wa1.avro", ...
    assert len(pane_keys) > s.num_shards, f"panes are formed per (shard, writer), not per shard: {sorted(pane_keys)}"
    assert sum(f["records"] for f in manifest["files"]) == len(sent), "no file was written over another"


def test_events_after_the_close_go_to_the_late_root_under_their_hour(settings, registry):
    s = settings()
    log = registry["service_log"]
    clock = Clock(START)
    clock.arrive(*(message(valid_fields(log, i), f"e{i}", (START + i) * 1000) for i in range(5)))
    clock.advance(WINDOW + LATENESS + TRIGGER)  # closes the first hour
    clock.arrive(
        message(valid_fields(log, 7), "late-1", (START + 7) * 1000),
        message(valid_fields(log, 1), "e1", (START + 1) * 1000),  # a repeat, after the close: a duplicate
        message(valid_fields(log, 8), "next-1", clock.now * 1000),
    )
    clock.advance(WINDOW + LATENESS + TRIGGER)
    run(s, clock)

    result = audit(s)
    assert not result.problems
    first = result.hours[partitions.partition(START, WINDOW)]
    assert (first.delivered, first.late, first.duplicates, first.closed) == (5, 1, 1, True)
    manifest = json.loads((hour_folder(s, START) / "_SUCCESS").read_text())
    listed = sorted(pathlib.Path(f["path"]).name for f in manifest["files"])
    present = sorted(p.name for p in hour_folder(s, START).iterdir() if p.name != "_SUCCESS")
    assert listed == present, "nothing was added to the folder after its marker"
    assert sorted(late_ids(s)) == ["late-1"], "delivered and late together hold each id once"


def test_an_hour_closed_by_an_earlier_run_stays_closed(settings, registry):
    log = registry["service_log"]
    first = settings(run_id="run1")
    clock = Clock(START)
    clock.arrive(message(valid_fields(log, 1), "e1", (START + 1) * 1000))
    clock.advance(WINDOW + LATENESS + TRIGGER)
    run(first, clock)
    marker = hour_folder(first, START) / "_SUCCESS"
    before = marker.read_bytes()

    # A restarted job has no state, and its watermark may lag: the marker decides.
    second = settings(run_id="run2")
    clock = Clock(START)
    clock.arrive(message(valid_fields(log, 2), "e2", (START + 2) * 1000))
    clock.advance(WINDOW + LATENESS + TRIGGER)
    run(second, clock)

    assert marker.read_bytes() == before
    result = audit(second)
    hour = result.hours[partitions.partition(START, WINDOW)]
    assert (hour.delivered_ids, late_ids(second)) == (["e1"], ["e2"])
    assert not result.problems


def test_a_staged_pane_moved_late_and_a_pane_written_late_never_share_a_name(settings, registry, monkeypatch):
    """Two writers number their files on their own in one late hour: the close moves a staged
    pane there under its staged name (the hour was closed by an earlier run), and ``WriteLate``
    writes the next pane of the same (shard, writer) once the watermark closed the hour here
    too. With one shard and one writer both are file number 0: neither may replace the other."""
    s = dataclasses.replace(settings(run_id="run2"), num_shards=1)
    log = registry["service_log"]
    monkeypatch.setattr(hours, "writer_id", lambda: "w1")
    files.write_json(s.layout.marker(START), build_manifest("service_log", START, WINDOW, START + WINDOW, {}, []))
    clock = Clock(START + 5)
    clock.arrive(message(valid_fields(log, 1), "staged-then-moved", (START + 1) * 1000))
    clock.advance(TRIGGER * 2)  # a pane staged while the watermark holds the hour open here
    clock.advance(WINDOW + LATENESS)
    clock.arrive(message(valid_fields(log, 2), "written-late", (START + 2) * 1000))
    clock.advance(TRIGGER * 2)
    run(s, clock)

    assert sorted(late_ids(s)) == ["staged-then-moved", "written-late"], "both late panes are kept"
    assert audit(s).hours[partitions.partition(START, WINDOW)].late == 2


def test_files_staged_by_a_stopped_run_are_published_with_the_hour(settings, registry):
    log = registry["service_log"]
    resumed = settings(run_id="run2")
    # A run that stopped before the hour closed left a staged pane and a dead letter behind.
    staged = {"event_id": "e1", "received_at": (START + 1) * 1000, **valid_fields(log, 1)}
    staging = resumed.layout.hour(resumed.layout.staging, START)
    leftover = partitions.pane_file_name("service_log", "run1", 0, shard_of("e1", resumed.num_shards))
    files.write_avro(f"{staging}/{leftover}", log.parsed_delivered_schema, [staged])
    rejected = dead_letter("service_log", ErrorKind.NOT_JSON, "not JSON", "bad", (START + 2) * 1000, {}, b"sealed")
    dead_letters = resumed.layout.hour(resumed.layout.dead_letter, START)
    leftover = partitions.pane_file_name("service_log", "run1", 0, shard_of("bad", resumed.num_shards))
    files.write_avro(f"{dead_letters}/{leftover}", parsed_dead_letter_schema(), [rejected])

    clock = Clock(START + 10)
    clock.arrive(
        message(valid_fields(log, 1), "e1", (START + 1) * 1000),  # a producer retry of what the stopped run staged
        message(valid_fields(log, 2), "e2", (START + 12) * 1000),
    )
    clock.advance(WINDOW + LATENESS + TRIGGER)
    run(resumed, clock)

    result = audit(resumed)
    hour = result.hours[partitions.partition(START, WINDOW)]
    assert sorted(hour.delivered_ids) == ["e1", "e2"] and hour.closed
    assert not result.problems
    manifest = json.loads((hour_folder(resumed, START) / "_SUCCESS").read_text())
    listed_ids = [r["event_id"] for f in manifest["files"] for r in files.read_avro(f["path"])]
    assert sorted(listed_ids) == ["e1", "e2"]
    assert manifest["accounting"] == {"in": 4, "delivered": 2, "duplicates": 1, "dead_lettered": 1, "forgotten": 0}


@pytest.mark.parametrize("type_name", sorted(load_registry()))
def test_every_message_is_accounted_for_in_every_hour(settings, registry, type_name):
    """in = delivered + duplicates + late + dead-lettered, per hour, over a mixed stream; and
    by id: every event is written exactly once, and only producer retries count as duplicates."""
    s = settings(type_name)
    event_type = registry[type_name]
    rng = random.Random(7)
    clock = Clock(START)
    sent = collections.Counter()  # partition -> messages sent for it
    retries = collections.Counter()  # partition -> producer retries sent for it
    written_once = []  # the id of every valid event, each of which must be delivered or late exactly once
    fresh = []
    for _ in range(12):
        batch = []
        for _ in range(8):
            draw = rng.random()
            if draw < 0.1:
                kind = rng.choice([k for k in MESSAGE_ERRORS if k is not ErrorKind.BAD_TIMESTAMP])
                data, attributes = malformed(event_type, kind, rng, clock.now * 1000, s.max_event_bytes)
                batch.append(PubsubMessage(data, attributes))
                sent[partitions.partition(clock.now - clock.now % WINDOW, WINDOW)] += 1
                continue
            # Retries at any time: before the close, after it while the ids' cells live, and after
            # they are gone, when the hour's index catches them (docs/delivery.md, "Late events").
            if draw < 0.3 and fresh:
                event_id, at = rng.choice(fresh)  # a producer retry: same id, same stamp
                retries[partitions.partition(at - at % WINDOW, WINDOW)] += 1
            elif draw < 0.5 and clock.now - START > WINDOW + LATENESS:
                event_id, at = f"late-{rng.getrandbits(32)}", START + rng.randrange(WINDOW)
                written_once.append(event_id)
            else:
                event_id, at = f"e-{rng.getrandbits(32)}", clock.now
                fresh.append((event_id, at))
                written_once.append(event_id)
            batch.append(message(valid_fields(event_type, rng.randrange(1000)), event_id, at * 1000))
            sent[partitions.partition(at - at % WINDOW, WINDOW)] += 1
        clock.arrive(*batch)
        clock.advance(TRIGGER * 3)
    clock.advance(WINDOW + LATENESS + TRIGGER)
    run(s, clock)

    result = audit(s)
    assert not result.problems
    assert {p: h.total for p, h in result.hours.items()} == dict(sent)
    assert sum(h.late for h in result.hours.values()) > 0 and sum(h.duplicates for h in result.hours.values()) > 0
    for hour in result.hours.values():
        assert len(set(hour.delivered_ids)) == len(hour.delivered_ids)
        assert hour.closed or not hour.delivered
    # Totals alone would not see an event dropped and counted as a duplicate.
    delivered = [event_id for hour in result.hours.values() for event_id in hour.delivered_ids]
    written = collections.Counter(delivered + late_ids(s))
    assert [i for i, n in written.items() if n > 1] == [], "written more than once"
    assert sorted(set(written_once) - set(written)) == [], "neither delivered nor late"
    assert sorted(set(written) - set(written_once)) == [], "written but never sent as a valid event"
    assert {p: h.duplicates for p, h in result.hours.items() if h.duplicates} == dict(retries)


def test_a_drain_publishes_no_open_hour_and_the_next_run_closes_it(settings, registry, monkeypatch):
    """Dataflow's drain moves the watermark to infinity while the hour is still open by the clock."""
    log = registry["service_log"]
    drained, next_run = settings(run_id="run1"), settings(run_id="run2")
    clock = Clock(START)
    clock.arrive(*(message(valid_fields(log, i), f"e{i}", (START + 1) * 1000) for i in range(5)))
    clock.arrive(raw_message(b"{broken", "bad"))
    clock.advance(TRIGGER * 2)  # panes are staged; then the drain
    monkeypatch.setattr(close, "wall_clock", lambda: START + TRIGGER * 2)
    run(drained, clock)

    assert not (hour_folder(drained, START) / "_SUCCESS").exists(), "an open hour is never published"
    staged = audit(drained).hours[partitions.partition(START, WINDOW)]
    assert staged.staged == 5 and not staged.closed

    # The next run sees no traffic for the hour; its start-up finds the hour and closes it on time.
    monkeypatch.setattr(close, "wall_clock", lambda: hour_closes_at(START) + 1)
    run(next_run, Clock(START + TRIGGER * 3).advance(WINDOW + LATENESS))
    manifest = json.loads((hour_folder(next_run, START) / "_SUCCESS").read_text())
    listed_ids = [r["event_id"] for f in manifest["files"] for r in files.read_avro(f["path"])]
    assert sorted(listed_ids) == [f"e{i}" for i in range(5)]
    assert (manifest["accounting"]["delivered"], manifest["accounting"]["dead_lettered"]) == (5, 1)
    closes = datetime.datetime.fromtimestamp(hour_closes_at(START), tz=datetime.timezone.utc)
    assert manifest["closed_at_watermark"] == closes.isoformat().replace("+00:00", "Z")
    assert not audit(next_run).problems and audit(next_run).settled


def test_an_hour_staged_by_two_runs_is_compacted_into_a_part_per_run(settings, registry, monkeypatch):
    """A run drained mid-hour leaves several panes staged; the next run stages more for the hour and
    closes it. Each run's panes are compacted into a part of their own (a run writes one schema),
    named by (hour, part), so neither part replaces the other, and every id is published once."""
    log = registry["service_log"]
    drained, next_run = settings(run_id="run1"), settings(run_id="run2")  # parts of up to 128 MB
    ids = {"run1": [], "run2": []}

    def stage_batches(clock, run_id):
        for batch in range(3):
            batch_ids = [f"{run_id}-{batch}-{i}" for i in range(4)]
            clock.arrive(
                *(message(valid_fields(log, i), event_id, (START + 1) * 1000) for i, event_id in enumerate(batch_ids))
            )
            clock.advance(TRIGGER * 2)
            ids[run_id] += batch_ids

    clock = Clock(START)
    stage_batches(clock, "run1")
    monkeypatch.setattr(close, "wall_clock", lambda: START + TRIGGER * 6)  # the drain comes while the hour is open
    run(drained, clock)
    assert len(files.glob(f"{drained.layout.staging}/service_log/*/*/*.avro")) > 1, "several panes staged"

    monkeypatch.setattr(close, "wall_clock", lambda: hour_closes_at(START) + 1)
    clock = Clock(START + TRIGGER * 7)
    stage_batches(clock, "run2")
    clock.advance(WINDOW + LATENESS)
    run(next_run, clock)

    manifest = json.loads((hour_folder(next_run, START) / "_SUCCESS").read_text())
    names = [pathlib.Path(f["path"]).name for f in manifest["files"]]
    assert names == ["service_log-part00000.avro", "service_log-part00001.avro"], names
    part_ids = [sorted(r["event_id"] for r in files.read_avro(f["path"])) for f in manifest["files"]]
    assert part_ids == [sorted(ids["run1"]), sorted(ids["run2"])], "each run's panes in a part of their own"
    assert [f["records"] for f in manifest["files"]] == [12, 12] == [len(p) for p in part_ids]
    result = audit(next_run)
    assert not result.problems and result.settled


def test_repeats_that_come_after_the_close_in_several_panes_are_each_counted(settings, registry):
    """Each pane of repeats that comes after the hour's close is counted in a file of its own
    beside the late files; none may replace another."""
    s = settings()
    log = registry["service_log"]
    sent = [message(valid_fields(log, i), f"e{i}", (START + i) * 1000) for i in range(6)]
    clock = Clock(START)
    clock.arrive(*sent)
    clock.advance(WINDOW + LATENESS + TRIGGER)  # the hour closes
    for batch in range(3):
        clock.arrive(*sent[2 * batch : 2 * batch + 2])  # producer retries, after the close
        clock.advance(TRIGGER * 2)
    run(s, clock)

    hour = audit(s).hours[partitions.partition(START, WINDOW)]
    assert (hour.delivered, hour.duplicates, hour.late) == (6, 6, 0)
    counted = files.glob(f"{s.layout.late}/service_log/*/*/{partitions.LATE_DUPLICATES_PATTERN}")
    assert len(counted) >= 3, f"a count per pane of repeats: {counted}"
    assert sum(files.read_json(path)["duplicates"] for path in counted) == 6


def test_the_same_id_in_another_hour_is_no_duplicate_and_repeats_late_in_a_long_open_hour_are(settings, registry):
    """The low tier keeps an hour open for two hours after it ends: a producer retry late in the open
    hour, or just after its close, is not delivered twice, and a copy of an id in the next hour is
    that hour's own."""
    s = dataclasses.replace(settings(), allowed_lateness_seconds=2 * WINDOW)
    log = registry["service_log"]
    first = [message(valid_fields(log, i), f"e{i}", (START + i) * 1000) for i in range(3)]
    clock = Clock(START)
    clock.arrive(*first, message(valid_fields(log, 1), "e1", (START + WINDOW + 1) * 1000))  # e1 in the next hour
    clock.advance(WINDOW + 2 * WINDOW - TRIGGER)  # the hour ended long ago, and is still open
    clock.arrive(first[1])
    clock.advance(2 * TRIGGER)  # now it closed
    clock.arrive(first[2])
    clock.advance(WINDOW + 2 * WINDOW + TRIGGER)  # and so did the next
    run(s, clock)

    result = audit(s)
    assert not result.problems
    hour, next_hour = (result.hours[partitions.partition(start, WINDOW)] for start in (START, START + WINDOW))
    assert sorted(hour.delivered_ids) == ["e0", "e1", "e2"] and next_hour.delivered_ids == ["e1"]
    assert (hour.duplicates, hour.late, next_hour.duplicates) == (2, 0, 0)
    assert late_ids(s) == [], "delivered and late hold each id once"


def test_hours_that_pass_without_traffic_get_markers_that_count_zero(settings, registry, monkeypatch):
    """From the job's start on, every hour closes, also one in which nothing arrived, so that a
    consumer waiting on its marker does not wait forever. Those still open by the clock when the
    stream ends (a drain) get none."""
    s = settings()
    log = registry["service_log"]
    now = [START]  # the wall clock: the job is built at START
    monkeypatch.setattr(close, "wall_clock", lambda: now[0])
    clock = Clock(START)
    clock.arrive(message(valid_fields(log, 1), "e1", (START + 1) * 1000))
    clock.advance(TRIGGER)
    for _ in range(4):
        clock.advance(WINDOW)  # hours pass, and nothing arrives
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), s)
        now[0] = clock.now  # the clock as the stream ends

    closed = [start for start in range(START, clock.now, WINDOW) if hour_closes_at(start) <= clock.now]
    assert closed == [START, START + WINDOW, START + 2 * WINDOW], "two hours without traffic passed"
    markers = files.glob(f"{s.layout.delivered}/service_log/dt=*/hr=*/_SUCCESS")
    assert markers == [s.layout.marker(start) for start in closed], "a marker for each, none for an hour still open"
    for start in closed[1:]:
        manifest = files.read_json(s.layout.marker(start))
        assert manifest["files"] == [] and set(manifest["accounting"].values()) == {0}, start
    assert files.read_json(s.layout.marker(START))["accounting"]["delivered"] == 1

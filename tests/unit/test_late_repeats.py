"""Repeats that come after their hour closed: delivered and late together still hold each id once per
hour, for the whole late horizon.

The close leaves the hour's ids in an index beside it; late panes read the buckets of it their
ids fall in, and the late files of their shard. Dataflow's terms are recreated on purpose: a
late pane's bundle is retried after its file was written (a lost commit), panes of one shard
come from several writers, and an index that cannot be read never fails a bundle.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import IntervalWindow
from google.api_core import exceptions as google_errors

from event_delivery.cloud import files
from event_delivery.contract import partitions
from pipelines.delivery import deliver
from pipelines.runtime import LOCAL_RUNNER
from tests.messages import forgotten_event, message, valid_fields
from tests.publishing import Cell, publish_planned
from tests.streams import LATENESS, START, TRIGGER, WINDOW, Clock, local_keys, local_settings, streaming_pipeline
from tools.ops.audit import audit_type
from transforms import close, id_index, index_buckets, publish, publish_hours
from transforms import late as late_path
from transforms.hours import shard_of
from transforms.id_index import index_bucket
from transforms.late import WriteLatePaneFn
from transforms.records import event_record
from transforms.reports import DELIVERED, DUPLICATES, LATE, report

CLOSES_AT = START + WINDOW + LATENESS
WINDOW_OF_THE_HOUR = IntervalWindow(START, CLOSES_AT)
SHARDS = 2
DAYS = 86400


class Number:
    """A key's file-number cell; ``commit=False`` plays a lost commit: the next try reads the old value."""

    def __init__(self):
        self.value, self.pending = None, None

    def read(self):
        return self.value

    def write(self, value):
        self.pending = value

    def commit(self):
        self.value = self.pending


def ids_of_shard(shard: int, count: int, prefix: str) -> list[str]:
    ids = (f"{prefix}{n}" for n in range(10_000))
    return [i for i in ids if shard_of(i, SHARDS) == shard][:count]


def event(registry, event_id: str) -> tuple:
    return (event_id, (START + 1) * 1000, valid_fields(registry["service_log"], 1))


def close_an_hour(settings, registry, delivered: dict[int, list[str]], run_id: str | None = None) -> dict:
    """Stages one pane per shard (of run ``run_id``, this one's by default) and closes the hour as
    ``CloseHour`` and ``PublishHours`` do, with the settings' shard count."""
    layout, schema = settings.layout, registry["service_log"].parsed_delivered_schema
    reports = []
    for shard, ids in delivered.items():
        name = partitions.pane_file_name("service_log", run_id or settings.run_id, 0, shard, "w1")
        path = partitions.join(layout.hour(layout.staging, START), name)
        files.write_avro(path, schema, [event_record(event(registry, i)) for i in ids], files.UNCOMPRESSED)
        reports.append(report(DELIVERED, len(ids), path))
    plan = publish.plan_hour(layout, START, CLOSES_AT, reports, False, 0, settings.num_shards)
    return publish_planned(layout, START, plan)


def staged_by_a_run_of(shards: int, ids: list[str]) -> dict[int, list[str]]:
    """``ids`` by the shard that a run of ``shards`` shards staged each in."""
    split: dict[int, list[str]] = {}
    for event_id in ids:
        split.setdefault(shard_of(event_id, shards), []).append(event_id)
    return split


def write_late(fn, number: Number, registry, shard: int, writer: str, ids: list[str], commit=True) -> list:
    events = [forgotten_event(registry["service_log"], i, (START + 1) * 1000, 1) for i in ids]
    outputs = list(fn.process(((shard, writer), events), WINDOW_OF_THE_HOUR, number))
    if commit:
        number.commit()
    return outputs


def late_ids(layout) -> list[str]:
    paths = files.glob(f"{layout.late}/service_log/*/*/*.avro")
    return [i for path in paths for i in files.read_event_ids(path)]


def delivered_ids(manifest: dict) -> list[str]:
    return [i for f in manifest["files"] for i in files.read_event_ids(f["path"])]


def test_repeats_days_after_the_close_are_duplicates_and_each_id_is_delivered_or_late_once(tmp_path, registry):
    """Days after the hour closed, its cells long gone, producers send again: ids delivered in the
    hour, and a straggler twice (two writers, and a bundle retried after its file was written)."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    delivered = {shard: ids_of_shard(shard, 5, "d") for shard in range(SHARDS)}
    manifest = close_an_hour(settings, registry, delivered)
    fn = WriteLatePaneFn(settings)
    fn.setup()
    numbers = {shard: Number() for shard in range(SHARDS)}  # the late path keys panes by shard alone
    straggler = ids_of_shard(0, 1, "x")[0]

    sent, outputs = [], []
    pane = delivered[0][:3] + [straggler]
    outputs += write_late(fn, numbers[0], registry, 0, "w1", pane, commit=False)  # its commit is lost ...
    outputs += write_late(fn, numbers[0], registry, 0, "w1", pane)  # ... and the bundle retried
    sent += pane
    for shard, writer, ids in ((0, "w2", [straggler, delivered[0][4]]), (1, "w1", delivered[1][:2])):
        outputs += write_late(fn, numbers[shard], registry, shard, writer, ids)
        sent += ids
    retried = outputs[:2]  # the first try's reports, which the lost commit never sent on
    counted = [r for r in outputs[2:] if r[0] in (DUPLICATES, LATE)]

    everywhere = delivered_ids(manifest) + late_ids(settings.layout)
    assert sorted(everywhere) == sorted({*everywhere}), "delivered and late hold each id once"
    assert late_ids(settings.layout) == [straggler], "the straggler is late once, its retried file rewritten"
    assert [r[0] for r in retried] == [DUPLICATES, LATE]
    duplicates = sum(n for kind, n, _ in counted if kind == DUPLICATES)
    late = sum(n for kind, n, _ in counted if kind == LATE)
    assert (late, duplicates) == (1, len(sent) - 1), "every copy that came late is late or a duplicate, counted"


def test_a_late_pane_that_holds_a_copy_twice_writes_it_once_and_counts_the_other(tmp_path, registry):
    """Late events are grouped into panes after ``GatherPanes``, which drops no copy of a closed
    hour: two copies can share a late pane."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    close_an_hour(settings, registry, {0: ids_of_shard(0, 2, "d")})
    fn = WriteLatePaneFn(settings)
    fn.setup()
    [straggler, other] = ids_of_shard(0, 2, "x")
    outputs = write_late(fn, Number(), registry, 0, "w1", [straggler, other, straggler])
    assert sorted(late_ids(settings.layout)) == sorted([straggler, other]), "each id late once"
    assert [(kind, n) for kind, n, _ in outputs] == [(DUPLICATES, 1), (LATE, 2)], "and the other copy counted"


def test_a_late_pane_of_an_hour_without_its_marker_is_staged_for_its_close_and_a_lost_trys_stays_for_the_next_run(
    tmp_path, registry
):
    """Before the marker the hour's index is not complete (its close has not planned or not finished): the
    late pane is staged under a name of its own, reported delivered, for the close to publish it, or to move
    it late less the ids the hour holds once the marker is written. A try whose commit was lost may have
    staged it just before the marker; the retry after writes it checked, and the lost try's file, which no
    report names, stays staged until a later run's start moves it late less what the hour holds."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    fn = WriteLatePaneFn(settings)
    fn.setup()
    delivered, [new] = ids_of_shard(0, 2, "d"), ids_of_shard(0, 1, "x")
    number, pane = Number(), [delivered[0], new, new]
    [repeat, (kind, records, staged)] = write_late(fn, number, registry, 0, "", pane, commit=False)
    assert repeat == report(DUPLICATES, 1) and (kind, records) == (DELIVERED, 2)
    assert staged.startswith(settings.layout.staging) and late_ids(settings.layout) == []
    assert files.read_event_ids(staged) == [delivered[0], new]

    close_an_hour(settings, registry, {0: delivered})
    outputs = write_late(fn, number, registry, 0, "", pane)  # the retry, after the marker
    assert [(kind, n) for kind, n, _ in outputs] == [(DUPLICATES, 2), (LATE, 1)] and late_ids(settings.layout) == [new]
    assert files.exists(staged) and partitions.STAGED_LATE_SERIES + "00000" in staged, "a name no late pane has"

    next_run = close.CloseHourFn(local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), "run2"))
    next_run.setup()
    next_run._clear_up_after_the_marker(WINDOW_OF_THE_HOUR)  # at its start
    assert late_ids(settings.layout) == [new] and not files.exists(staged), "each id delivered or late once"


def stage_after_the_close(settings, registry, ids: list[str], run_id: str = "run2", shard: int = 0) -> str:
    """A pane file of ``ids`` that a run staged for the hour after it closed; its path."""
    name = partitions.pane_file_name("service_log", run_id, 7, shard, "w9")
    path = partitions.join(settings.layout.hour(settings.layout.staging, START), name)
    records = [event_record(event(registry, i)) for i in ids]
    files.write_avro(path, registry["service_log"].parsed_delivered_schema, records, files.UNCOMPRESSED)
    return path


def late_duplicates(layout) -> int:
    return sum(files.read_json(p)["duplicates"] for p in files.glob(f"{layout.late}/service_log/*/*/_duplicates-*"))


def test_a_file_staged_after_the_close_moves_late_less_what_the_hour_holds_once_however_often_it_is_tried(
    tmp_path, registry, monkeypatch
):
    """A pane that reached the staging folder after the close (the close is the one authority on that)
    may hold copies of ids the hour published. Moved late, it keeps only ids the hour
    does not hold, delivered or late; a try that crashed before deleting it runs again to the same files."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    delivered = {shard: ids_of_shard(shard, 5, "d") for shard in range(SHARDS)}
    manifest = close_an_hour(settings, registry, delivered)
    straggler, again = ids_of_shard(0, 2, "x")
    first = stage_after_the_close(settings, registry, [delivered[0][0], straggler])
    destination = partitions.join(settings.layout.hour(settings.layout.late, START), posixpath.basename(first))
    with monkeypatch.context() as patch:
        patch.setattr(files, "delete_existing", lambda paths: [])  # the try crashes before the staged file goes
        late_path.move_late_checked(settings.layout, START, first, destination, SHARDS, "deflate")
    assert late_path.move_late_checked(settings.layout, START, first, destination, SHARDS, "deflate") == (1, 1, [])
    assert late_path.move_late_checked(settings.layout, START, first, destination, SHARDS, "deflate") is None
    second = stage_after_the_close(settings, registry, [straggler, again, delivered[0][1]], shard=0, run_id="run3")
    elsewhere = partitions.join(settings.layout.hour(settings.layout.late, START), posixpath.basename(second))
    assert late_path.move_late_checked(settings.layout, START, second, elsewhere, SHARDS, "deflate")[:2] == (1, 2)

    everywhere = delivered_ids(manifest) + late_ids(settings.layout)
    assert sorted(everywhere) == sorted({*everywhere}), "delivered and late hold each id once"
    assert sorted(late_ids(settings.layout)) == sorted([straggler, again])
    assert late_duplicates(settings.layout) == 3, "every copy moved is late or a counted duplicate"
    assert not files.glob(f"{settings.layout.staging}/service_log/*/*/*.avro")


@pytest.mark.parametrize("index_first", ["unreadable", "readable"])
def test_a_move_retried_after_a_crash_with_another_view_of_the_index_leaves_only_what_it_wrote(
    tmp_path, registry, monkeypatch, index_first
):
    """A first try that could not read the index (a transient error: unchecked) writes a delivered id
    late; one that could counts it as a duplicate. Either crashes before the staged file goes, and the
    retry sees the index the other way: what the first wrote must go, or the id is delivered and late
    though checked, or late and a duplicate (in = delivered + duplicates + late no more)."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    delivered = {0: ids_of_shard(0, 3, "d"), 1: []}
    manifest = close_an_hour(settings, registry, delivered)
    staged = stage_after_the_close(settings, registry, delivered[0][:1])
    destination = partitions.join(settings.layout.hour(settings.layout.late, START), posixpath.basename(staged))
    index, readable = break_the_index(settings)
    views = [lambda: None, lambda: files.write_json(index, readable)]
    if index_first == "readable":
        views.reverse()
    views[0]()
    with monkeypatch.context() as patch:
        patch.setattr(files, "delete_existing", lambda paths: [])  # the try crashes before the staged file goes
        late_path.move_late_checked(settings.layout, START, staged, destination, SHARDS, "deflate")
    views[1]() if index_first == "unreadable" else break_the_index(settings)
    moved, repeats, _ = late_path.move_late_checked(settings.layout, START, staged, destination, SHARDS, "deflate")

    assert len(late_ids(settings.layout)) == moved and late_duplicates(settings.layout) == repeats
    assert moved + repeats == 1, "the copy is late or a duplicate, once"
    if index_first == "unreadable":  # the retry checked: the id is delivered only
        assert (moved, late_ids(settings.layout)) == (0, []) and delivered_ids(manifest).count(delivered[0][0]) == 1


def test_a_file_staged_after_the_close_is_checked_by_the_shards_of_this_run(tmp_path, registry):
    """A file of a run with another shard count holds ids of several of this run's shards: each is
    looked up in its own shard's index."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    delivered = {shard: ids_of_shard(shard, 5, "d") for shard in range(SHARDS)}
    close_an_hour(settings, registry, delivered)
    staged = stage_after_the_close(settings, registry, [delivered[0][0], delivered[1][0]], run_id="run5")
    destination = partitions.join(settings.layout.hour(settings.layout.late, START), "moved.avro")
    assert late_path.move_late_checked(settings.layout, START, staged, destination, SHARDS, "deflate") == (0, 2, [])
    assert not files.exists(destination) and late_duplicates(settings.layout) == 2


def break_the_index(settings) -> tuple[str, list]:
    """Makes shard 0's index of the hour unreadable; returns its path and what it held, to mend it with."""
    index = files.glob(f"{settings.layout.id_index}/service_log/*/*/s000-*.json")
    assert index, "the close left the shard's index beside the hour"
    readable = files.read_json(index[0])
    with open(index[0], "w") as broken:
        broken.write("{not json")
    return index[0], readable


def test_an_hour_the_late_path_cannot_check_is_written_late_and_counted(tmp_path, registry, caplog):
    """An index that cannot be read, or is missing, never fails a bundle: the pane is written as it is."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    delivered = {0: ids_of_shard(0, 3, "d")}
    close_an_hour(settings, registry, delivered)
    break_the_index(settings)
    fn = WriteLatePaneFn(settings)
    fn.setup()
    with caplog.at_level(logging.WARNING, logger=late_path.__name__):
        outputs = write_late(fn, Number(), registry, 0, "w1", delivered[0])
    assert [(kind, n) for kind, n, _ in outputs] == [(LATE, 3)], "written late, none dropped"
    assert "was not checked against its hour's index" in caplog.text


def test_a_retry_that_drops_what_its_lost_try_wrote_unchecked_leaves_no_file_of_it(tmp_path, registry):
    """The first try cannot read the index (a transient error) and writes a delivered id late
    unchecked; its commit is lost. The retry reads the index and drops the id: the first try's file
    must go, or the id is both delivered and late."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    delivered = {0: ids_of_shard(0, 3, "d"), 1: []}
    manifest = close_an_hour(settings, registry, delivered)
    index, readable = break_the_index(settings)
    fn, number = WriteLatePaneFn(settings), Number()
    fn.setup()
    first = write_late(fn, number, registry, 0, "", delivered[0][:1], commit=False)
    files.write_json(index, readable)
    retried = write_late(fn, number, registry, 0, "", delivered[0][:1])

    assert [r[0] for r in first] == [LATE] and [(kind, n) for kind, n, _ in retried] == [(DUPLICATES, 1)]
    everywhere = delivered_ids(manifest) + late_ids(settings.layout)
    assert late_ids(settings.layout) == [] and sorted(everywhere) == sorted({*everywhere}), "each id once"


def a_retry_after_an_unchecked_lost_try(settings, registry, monkeypatch, delete_fails_with: list) -> tuple:
    """As above; the retry's deletion of the first try's file first fails with each of ``delete_fails_with``.
    Returns the hour's manifest and the retry's reports."""
    delivered = {0: ids_of_shard(0, 3, "d"), 1: []}
    manifest = close_an_hour(settings, registry, delivered)
    index, readable = break_the_index(settings)
    fn, number = WriteLatePaneFn(settings), Number()
    fn.setup()
    write_late(fn, number, registry, 0, "", delivered[0][:1], commit=False)
    files.write_json(index, readable)
    delete_existing = files.delete_existing

    def delete(paths):
        if delete_fails_with:
            raise delete_fails_with.pop(0)
        return delete_existing(paths)

    monkeypatch.setattr(late_path.files, "delete_existing", delete)
    monkeypatch.setattr(late_path.retries, "sleep", lambda seconds: None)
    return manifest, write_late(fn, number, registry, 0, "", delivered[0][:1])


def test_a_lost_trys_file_that_a_transient_error_keeps_is_deleted_on_a_retry_of_the_call(
    tmp_path, registry, monkeypatch
):
    """A transient error of the deletion is retried (or fails the bundle): logged and let be, it left the
    first try's file, whose id was then delivered, late and a duplicate."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    busy = google_errors.ServiceUnavailable("busy")
    manifest, retried = a_retry_after_an_unchecked_lost_try(settings, registry, monkeypatch, [busy])
    assert [(kind, n) for kind, n, _ in retried] == [(DUPLICATES, 1)] and late_ids(settings.layout) == []

    again = tmp_path / "again"
    again.mkdir()
    settings = local_settings(again, registry["service_log"], local_keys(again), num_shards=SHARDS)
    with pytest.raises(google_errors.ServiceUnavailable):  # one that does not pass: the runner retries
        a_retry_after_an_unchecked_lost_try(settings, registry, monkeypatch, [busy] * late_path.retries.ATTEMPTS)


def test_a_lost_trys_file_that_cannot_be_deleted_holds_late_ids_that_are_no_duplicates(tmp_path, registry, monkeypatch):
    """A deletion denied for good leaves the first try's file: its id is late there (the audit counts the
    file), so the retry reports no duplicate of it: each copy counted once, in = delivered + duplicates + late."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    denied = google_errors.Forbidden("no delete")
    manifest, retried = a_retry_after_an_unchecked_lost_try(settings, registry, monkeypatch, [denied])
    duplicates = sum(n for kind, n, _ in retried if kind == DUPLICATES)
    sent = len(delivered_ids(manifest)) + 1
    assert len(delivered_ids(manifest)) + len(late_ids(settings.layout)) + duplicates == sent


def test_a_retry_that_takes_its_panes_in_another_order_loses_no_first_copy(tmp_path, registry):
    """A retried work item may process its panes in another order: the first try's files, whose
    commit was lost, are no earlier copies (the retry rewrites their names), so no id is dropped
    against a file that is then overwritten."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    close_an_hour(settings, registry, {0: ids_of_shard(0, 1, "d"), 1: []})
    x, y, z = ids_of_shard(0, 3, "x")
    fn, number = WriteLatePaneFn(settings), Number()
    fn.setup()
    for pane in ([x], [y]):  # the first try writes l0 = {x}, l1 = {y} ...
        write_late(fn, number, registry, 0, "", pane, commit=False)
        number.value = number.pending
    number.value = number.pending = None  # ... and its commit is lost
    for pane in ([y], [x], [z]):  # the retry, in another order, then a new pane
        write_late(fn, number, registry, 0, "", pane)

    assert sorted(late_ids(settings.layout)) == sorted([x, y, z]), "every id late once"


def test_a_late_pane_reads_only_the_index_buckets_its_ids_fall_in(tmp_path, registry, monkeypatch):
    """The index of a shard is split so that a bucket holds at most ``IDS_PER_BUCKET`` ids: what a late
    pane reads is bounded by its own ids, not by the hour."""
    monkeypatch.setattr(id_index, "IDS_PER_BUCKET", 10)
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    delivered = {0: ids_of_shard(0, 95, "d")}
    close_an_hour(settings, registry, delivered)
    buckets = files.glob(f"{settings.layout.id_index}/service_log/*/*/s000-*.json")
    assert len(buckets) == 10 and all(len(files.read_json(path)) <= 20 for path in buckets)
    read, read_json = [], files.read_json
    monkeypatch.setattr(late_path.files, "read_json", lambda path: read.append(path) or read_json(path))
    fn = WriteLatePaneFn(settings)
    fn.setup()
    outputs = write_late(fn, Number(), registry, 0, "w1", [delivered[0][7]])
    assert [(kind, n) for kind, n, _ in outputs] == [(DUPLICATES, 1)]
    assert len(read) == 1 and read[0].endswith(f"-b{index_bucket(delivered[0][7], SHARDS, 10):05d}-of00010.json")


def test_the_close_emits_each_staged_file_once_however_many_index_tasks_it_emits(tmp_path, registry):
    """The close emits its index tasks in one commit, under Dataflow's ~80 MB limit, and the hour's parts go
    out in another once the index is written: an index task names no files (it reads them from a list of its
    own), so neither commit holds a file twice."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    layout, schema = settings.layout, registry["service_log"].parsed_delivered_schema
    delivered = {shard: ids_of_shard(shard, 40, "d") for shard in range(SHARDS)}
    reports = []
    for shard, ids in delivered.items():
        for number, event_id in enumerate(ids):  # a file per event: many files per shard
            name = partitions.pane_file_name("service_log", settings.run_id, number, shard, "w1")
            path = partitions.join(layout.hour(layout.staging, START), name)
            files.write_avro(path, schema, [event_record(event(registry, event_id))], files.UNCOMPRESSED)
            reports.append(report(DELIVERED, 1, path))
    plan = publish.plan_hour(layout, START, CLOSES_AT, reports, False, 1, SHARDS)
    tasks, parts = json.dumps(publish.index_to_read(plan)), json.dumps(publish.parts_to_write(plan))
    assert not any(posixpath.basename(path) in tasks for _, _, path in reports), "the close's commit names none"
    assert all(parts.count(posixpath.basename(path)) == 1 for _, _, path in reports), "the parts' names each once"
    publish_planned(layout, START, plan)
    fn = WriteLatePaneFn(settings)
    fn.setup()
    outputs = write_late(fn, Number(), registry, 1, "", delivered[1])
    assert [(kind, n) for kind, n, _ in outputs] == [(DUPLICATES, 40)], "the index holds the shard's ids"


def stage_files(settings, registry, files_of_ids: list[list[str]]) -> list[tuple]:
    """One staged pane file per list of ids, in the shard of its first id; their reports."""
    layout, schema = settings.layout, registry["service_log"].parsed_delivered_schema
    reports = []
    for number, ids in enumerate(files_of_ids):
        name = partitions.pane_file_name("service_log", settings.run_id, number, shard_of(ids[0], SHARDS), "w1")
        path = partitions.join(layout.hour(layout.staging, START), name)
        files.write_avro(path, schema, [event_record(event(registry, i)) for i in ids], files.UNCOMPRESSED)
        reports.append(report(DELIVERED, len(ids), path))
    return reports


def run_publish_hours(settings, plan: dict) -> list[str]:
    """``PublishHours`` on the local runner, with the hour as ``CloseHour`` emits it; the markers written."""
    planned = [(START, (publish.PLANNED, publish.buckets_planned(plan)))]
    with beam.Pipeline(runner=LOCAL_RUNNER) as pipeline:
        hour = {
            "planned": pipeline | "Planned" >> beam.Create(planned),
            "index_tasks": pipeline | "Tasks" >> beam.Create([(START, task) for task in publish.index_to_read(plan)]),
        }
        markers = hour | publish_hours.PublishHours(settings)
        assert_that(markers | beam.combiners.ToList(), equal_to([[settings.layout.marker(START)]]))
    return [settings.layout.marker(START)]


def test_a_shard_hour_far_past_what_a_task_may_hold_is_indexed_by_chunks_shuffled_to_buckets(
    tmp_path, registry, monkeypatch
):
    """At 1M events/s a shard-hour holds ~225M ids: no task may hold them. Its files are read in chunks of
    at most ``IDS_PER_CHUNK`` records, whose ids are shuffled to their buckets; every id is then in the one
    bucket a late pane reads for it, no task or element held more than a chunk, no key more than a group,
    and late repeats of the hour are dropped: in = delivered + duplicates + late + dead-lettered."""
    monkeypatch.setattr(id_index, "IDS_PER_CHUNK", 1_500)
    monkeypatch.setattr(id_index, "IDS_PER_BUCKET", 1_000)
    monkeypatch.setattr(id_index, "BUCKETS_PER_GROUP", 2)
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    ids = [i for i in (f"d{n}" for n in range(12_000)) if shard_of(i, SHARDS) == 0][:5_000]
    reports = stage_files(settings, registry, [ids[n : n + 1_000] for n in range(0, 5_000, 1_000)])  # shard 1: none
    plan = publish.plan_hour(settings.layout, START, CLOSES_AT, reports, False, 0, SHARDS)
    [buckets] = {task["buckets"] for task in plan["index"] if task["index_of_shard"] == 0}
    chunks = [task for task in plan["index"] if task["index_of_shard"] == 0]
    assert len(chunks) >= 3 and buckets >= 4, "the shard is past what one task or one bucket holds"
    read, held = [], []
    monkeypatch.setattr(index_buckets, "ids_by_group", counted(id_index.ids_by_group, read))
    monkeypatch.setattr(index_buckets, "write_bucket", counted_bucket(id_index.write_bucket, held))

    run_publish_hours(settings, plan)
    folder = settings.layout.hour(settings.layout.id_index, START)
    written = {path: set(files.read_json(path)) for path in files.glob(partitions.join(folder, "s000-*.json"))}
    for event_id in ids:
        name = partitions.id_index_name(0, index_bucket(event_id, SHARDS, buckets), buckets, SHARDS)
        assert [posixpath.basename(p) for p, held_ids in written.items() if event_id in held_ids] == [name]
    assert len(read) == len(plan["index"]) and max(map(sum, read)) <= 1_500, "a task holds one chunk"
    groups = -(-buckets // 2)
    assert sorted(map(len, read)) == [1] + [groups] * len(chunks), "an element per group of buckets, empty ones too"
    assert len(held) == buckets + 1 and max(held) <= 2 * 1_000, "a bucket holds ~IDS_PER_BUCKET ids"

    fn = WriteLatePaneFn(settings)
    fn.setup()
    straggler = ids_of_shard(0, 1, "x")[0]
    repeats = ids[::50]
    outputs = write_late(fn, Number(), registry, 0, "", repeats + [straggler])
    manifest = files.read_json(settings.layout.marker(START))
    late = sum(n for kind, n, _ in outputs if kind == LATE)
    duplicates = sum(n for kind, n, _ in outputs if kind == DUPLICATES)
    assert (late, duplicates) == (1, len(repeats)) and late_ids(settings.layout) == [straggler]
    sent = len(ids) + len(repeats) + 1
    accounting = manifest["accounting"]
    assert accounting["delivered"] + accounting["duplicates"] + duplicates + late + accounting["dead_lettered"] == sent


def counted(ids_by_group, read: list):
    """``ids_by_group`` that notes, per read task, how many entries each element it sends holds."""

    def counting(folder, task, sources):
        elements = list(ids_by_group(folder, task, sources))
        read.append([sum(map(len, entries)) for _, (_, _, _, entries) in elements])
        return elements

    return counting


def counted_bucket(write_bucket, held: list):
    """``write_bucket`` that notes how many entries each bucket it writes holds."""

    def counting(folder, shard, bucket, buckets, num_shards, parts):
        parts = list(parts)
        held.append(len({entry for part in parts for entry in part}))
        return write_bucket(folder, shard, bucket, buckets, num_shards, parts)

    return counting


def test_a_late_pane_of_a_job_with_another_shard_count_is_written_unchecked_and_counted(tmp_path, registry, caplog):
    """A job redeployed (or a redrive) with another ``num_shards`` puts an id in another shard, whose
    index files it would read in vain: the index names its shard count, and a mismatch is unchecked."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    delivered = {0: ids_of_shard(0, 20, "d"), 1: []}
    close_an_hour(settings, registry, delivered)
    more_shards = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS + 1)
    fn = WriteLatePaneFn(more_shards)
    fn.setup()
    moved = [i for i in delivered[0] if shard_of(i, SHARDS + 1) == 1]
    with caplog.at_level(logging.WARNING, logger=late_path.__name__):
        outputs = write_late(fn, Number(), registry, 1, "", moved)
    assert [(kind, n) for kind, n, _ in outputs] == [(LATE, len(moved))]
    assert f"split into other shards than {SHARDS + 1}" in caplog.text, "counted as unchecked, not taken as new"


@pytest.mark.parametrize("staged_shards", [4, 3, 1])
def test_staged_files_of_a_run_of_another_shard_count_never_stall_the_close_nor_hide_repeats(
    tmp_path, registry, caplog, staged_shards
):
    """Shards change by a drain and a deploy of the new layout, which leaves the old run's staged files for
    the open hours. Its shard numbers may be past the new count (a plan that raised on them would be retried
    forever, and hold the watermark), and its files hold ids of several new shards: an index that took
    them by the name would miss repeats, unseen. Each late repeat is a duplicate, or unchecked and counted."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    ids = [f"d{n}" for n in range(40)]
    manifest = close_an_hour(settings, registry, staged_by_a_run_of(staged_shards, ids), run_id="drained")
    fn, outputs = WriteLatePaneFn(settings), []
    fn.setup()
    with caplog.at_level(logging.WARNING, logger=late_path.__name__):
        for shard in range(SHARDS):
            outputs += write_late(fn, Number(), registry, shard, "", [i for i in ids if shard_of(i, SHARDS) == shard])

    assert sorted(delivered_ids(manifest)) == sorted(ids), "the hour closed with every staged file"
    dropped = sum(n for kind, n, _ in outputs if kind == DUPLICATES)
    unchecked = caplog.text.count("was not checked against its hour's index")
    if staged_shards % SHARDS == 0:
        assert dropped == len(ids) and not unchecked, "a split the new one refines: every repeat dropped"
    else:
        assert unchecked == SHARDS and "another shard count" in caplog.text, "each late pane counted unchecked"


def test_what_a_late_pane_reads_is_bounded_by_its_budget_not_by_the_hour_or_the_late_burst(
    tmp_path, registry, monkeypatch, caplog
):
    """A burst of late panes for one shard-hour: each pane reads at most ``READ_BUDGET_BYTES`` of the index
    and the late files (else the reads grow with the burst, and ``CloseHour``, which hears of each late
    file, holds the watermark); what the budget does not reach is written unchecked, counted."""
    monkeypatch.setattr(id_index, "IDS_PER_BUCKET", 10)
    monkeypatch.setattr(id_index, "READ_BUDGET_BYTES", 8_000)
    monkeypatch.setattr(id_index, "MIN_READ_BYTES", 0)
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    delivered = {0: ids_of_shard(0, 95, "d")}
    close_an_hour(settings, registry, delivered)
    read = []
    for name in ("read_json", "read_event_ids"):
        real = getattr(files, name)
        monkeypatch.setattr(
            late_path.files, name, lambda path, real=real: read.append(os.path.getsize(path)) or real(path)
        )
    fn, number = WriteLatePaneFn(settings), Number()
    fn.setup()

    first = write_late(fn, number, registry, 0, "", delivered[0][:1])
    read_per_pane = [sum(read)]
    stragglers = ids_of_shard(0, 20, "x")
    for straggler in stragglers:  # a burst: each pane one new id, one more late file
        read.clear()
        write_late(fn, number, registry, 0, "", [straggler])
        read_per_pane.append(sum(read))
    read.clear()
    with caplog.at_level(logging.WARNING, logger=late_path.__name__):
        last = write_late(fn, number, registry, 0, "", stragglers)  # all again: each in a late file
    read_per_pane.append(sum(read))

    assert [(kind, n) for kind, n, _ in first] == [(DUPLICATES, 1)], "within the budget, checked"
    assert max(read_per_pane) <= 8_000, "no pane reads past its budget"
    dropped = sum(n for kind, n, _ in last if kind == DUPLICATES)
    assert 0 < dropped < 20 and "past its 8000 bytes to read" in caplog.text, "the rest unchecked, counted"


@pytest.fixture
def stream_settings(tmp_path, registry):
    return local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=3)


def test_the_delivery_path_drops_repeats_that_come_long_after_the_close(stream_settings, registry):
    """The whole path on a TestStream: ids republished many windows after their hour closed are
    duplicates; a new straggler is late once."""
    s = stream_settings
    log = registry["service_log"]
    sent = [message(valid_fields(log, i), f"e{i}", (START + i) * 1000) for i in range(6)]
    straggler = message(valid_fields(log, 9), "late-1", (START + 9) * 1000)
    clock = Clock(START)
    clock.arrive(*sent)
    clock.advance(WINDOW + LATENESS + 4 * WINDOW)  # closed and published long ago
    clock.arrive(*sent[:4], straggler)
    clock.advance(TRIGGER * 2)
    clock.arrive(*sent[3:], straggler)  # again, in a later pane
    clock.advance(TRIGGER * 2)
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), s)

    result = audit_type(s.layout)
    assert not result.problems
    hour = result.hours[partitions.partition(START, WINDOW)]
    assert sorted(hour.delivered_ids) == [f"e{i}" for i in range(6)]
    assert late_ids(s.layout) == ["late-1"], "delivered and late hold each id once"
    assert (hour.delivered, hour.late, hour.duplicates) == (6, 1, 4 + 3 + 1)
    assert hour.total == len(sent) + 5 + 4, "in = delivered + duplicates + late + dead-lettered"


def test_each_file_waits_for_the_marker_no_longer_than_its_own_bound():
    """A file that began to wait late in another's wait gets the whole wait of its own: the files are due
    once the hour is published, or each once it waited ``WAITING_SECONDS``; the timer looks again for the
    rest, and stops once none is left."""
    values = {}
    waiting = late_path.Waiting(Cell(values, "waiting", []), Cell(values, "looking"), Cell(values, "timer"))
    waiting.add("first", 0)
    waiting.add("second", late_path.WAITING_SECONDS - 60)
    assert values["timer"] == late_path.LOOKING_SECONDS, "set once, by the first"
    assert waiting.due(published=False, now=late_path.WAITING_SECONDS - 1) == []
    assert waiting.due(published=False, now=late_path.WAITING_SECONDS) == ["first"], "the first waited enough"
    assert values["timer"] == late_path.WAITING_SECONDS + late_path.LOOKING_SECONDS, "and looks again for the rest"
    assert waiting.due(published=True, now=late_path.WAITING_SECONDS + 60) == ["second"], "published: all of it"
    assert "looking" not in values and not values.get("waiting"), "nothing waits, nothing looks"

"""The close's index on Dataflow's terms: a read task or a bucket writer run twice (a lost commit), the
marker only after the last bucket, a plan saved by an earlier version, and ids of any length.

The steps are called one by one, as ``tests.publishing`` does; ``tests/unit/test_late_repeats.py`` runs
them on the local runner.
"""

from __future__ import annotations

import copy

from event_delivery.cloud import files
from event_delivery.contract import partitions
from tests.publishing import BucketWriter, Cell, index_reader, publish_planned
from tests.streams import local_keys, local_settings
from tests.unit.test_late_repeats import CLOSES_AT, SHARDS, START, Number, stage_files, write_late
from transforms import id_index, publish
from transforms.hours import shard_of
from transforms.late import WriteLatePaneFn
from transforms.reports import DUPLICATES


def ids_of(shard: int, count: int, prefix: str = "d") -> list[str]:
    return [i for i in (f"{prefix}{n}" for n in range(10 * count + 100)) if shard_of(i, SHARDS) == shard][:count]


def planned_hour(tmp_path, registry, monkeypatch, files_of_ids: list[list[str]]):
    """Settings and the saved plan of an hour of ``files_of_ids``, in chunks of 100 records, buckets of 100."""
    monkeypatch.setattr(id_index, "IDS_PER_CHUNK", 100)
    monkeypatch.setattr(id_index, "IDS_PER_BUCKET", 100)
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    reports = stage_files(settings, registry, files_of_ids)
    return settings, publish.plan_hour(settings.layout, START, CLOSES_AT, reports, False, 0, SHARDS)


def index_files(layout) -> dict[str, list]:
    folder = layout.hour(layout.id_index, START)
    return {path: files.read_json(path) for path in files.glob(partitions.join(folder, "*.json"))}


def test_a_read_task_or_a_bucket_writer_run_twice_writes_and_sends_what_it_does_once(tmp_path, registry, monkeypatch):
    """A work item whose commit was lost runs again: a read task reads the same chunk and sends the same
    elements (only one try's are committed); the last chunk's writer writes the same file from the same
    state, and tells of one bucket per committed try."""
    settings, plan = planned_hour(tmp_path, registry, monkeypatch, [ids_of(0, 100), ids_of(0, 100, "e")])
    layout, reader = settings.layout, index_reader(settings.layout)
    tasks = [t for t in publish.to_write(plan) if id_index.is_index_task(t) and t["index_of_shard"] == 0]
    assert len(tasks) == 2 and tasks[0]["buckets"] == 2
    sent = [[list(reader.process((START, task))) for _ in range(2)] for task in tasks]
    assert all(first == again for first, again in sent), "a retried read task sends what its lost try did"

    writer = BucketWriter(layout)
    for bucket_ids in sent[0][0]:
        assert writer.process(bucket_ids) == [], "no bucket is written before every chunk was read"
    last = sent[1][0][0]
    committed = copy.deepcopy(writer.state)
    assert writer.process(last) == [(START, 2)], "the group's two buckets"
    written = index_files(layout)
    writer.state = committed  # the commit was lost: the retry sees the state before it
    assert writer.process(last) == [(START, 2)] and index_files(layout) == written, "the retry rewrites the files"
    assert writer.state[last[0]] == {}, "the bucket's key keeps nothing once written"


def test_the_marker_waits_for_the_last_bucket(tmp_path, registry, monkeypatch):
    """``PublishWhenWrittenFn`` counts parts and buckets against ``planned_writes``: until the last bucket of
    the last shard is written there is no marker, and a marker means a complete index."""
    settings, plan = planned_hour(tmp_path, registry, monkeypatch, [ids_of(0, 100), ids_of(0, 50, "e"), ids_of(1, 3)])
    layout, reader, writer = settings.layout, index_reader(settings.layout), BucketWriter(settings.layout)
    publish_fn = publish.PublishWhenWrittenFn(settings)
    publish_fn.setup()
    state = {}

    def progress(kind, count) -> list:
        cells = {name: Cell(state, name) for name in ("parts", "written")}
        return list(publish_fn.process((START, (kind, count)), parts=cells["parts"], written=cells["written"]))

    assert progress(publish.PLANNED, publish.planned_writes(plan)) == []
    markers = []
    for task in publish.to_write(plan):
        if id_index.is_index_task(task):
            written = [n for group_ids in reader.process((START, task)) for _, n in writer.process(group_ids)]
        else:
            publish.write_part(layout, START, task)
            written = [1]
        for count in written:
            assert not files.exists(layout.marker(START)), "no marker before the last write"
            markers += progress(publish.WRITTEN, count)
    assert markers == [layout.marker(START)] and files.exists(layout.marker(START))
    assert len(index_files(layout)) == 2 + 1, "two buckets of shard 0, one of shard 1"


def test_a_plan_saved_before_chunks_indexes_its_shards_and_skips_the_one_it_skipped(tmp_path, registry, monkeypatch):
    """A drained run of the earlier layout may leave a saved plan with one index task per shard (0 buckets for a
    shard it skipped for its size): the next run reads each as a chunk of all its shard's files, and writes
    the skipped shard's sentinel, both before the marker."""
    settings, plan = planned_hour(tmp_path, registry, monkeypatch, [ids_of(0, 30), ids_of(1, 20)])
    plan["index"] = [
        {"index_of_shard": 0, "buckets": 2, "num_shards": SHARDS},
        {"index_of_shard": 1, "buckets": 0, "num_shards": SHARDS},
    ]
    files.write_json(publish.plan_path(settings.layout, START), plan)
    assert publish.planned_writes(plan) == len(plan["parts"]) + 2 + 1

    publish_planned(settings.layout, START, publish.plan_hour(settings.layout, START, CLOSES_AT, [], False, 0, SHARDS))
    names = sorted(path.rsplit("/", 1)[-1] for path in index_files(settings.layout))
    assert names == [
        "s000-n002-b00000-of00002.json",
        "s000-n002-b00001-of00002.json",
        "s001-n002-b00000-of00001.json",
        "s001-n002-skipped.json",
    ]
    fn = WriteLatePaneFn(settings)
    fn.setup()
    outputs = write_late(fn, Number(), registry, 0, "", ids_of(0, 30)[:5])
    assert [(kind, n) for kind, n, _ in outputs] == [(DUPLICATES, 5)]


def test_an_id_of_any_length_is_indexed_within_the_bound_of_an_entry(tmp_path, registry, monkeypatch):
    """An id may be as long as an attribute (1 KB): the index holds a long one by its digest, so a chunk's
    elements stay bounded by records; its late repeat is a duplicate, also against an older index that
    holds it as it is."""
    long_id = next(i for i in (f"{n:04d}" + "x" * 1000 for n in range(100)) if shard_of(i, SHARDS) == 0)
    settings, plan = planned_hour(tmp_path, registry, monkeypatch, [[long_id, *ids_of(0, 5)]])
    publish_planned(settings.layout, START, plan)
    entries = [entry for held in index_files(settings.layout).values() for entry in held]
    assert long_id not in entries and max(map(len, entries)) <= len(id_index.DIGEST) + 64
    fn = WriteLatePaneFn(settings)
    fn.setup()
    assert [(k, n) for k, n, _ in write_late(fn, Number(), registry, 0, "", [long_id])] == [(DUPLICATES, 1)]

    [path] = [p for p, held in index_files(settings.layout).items() if id_index.index_entry(long_id) in held]
    files.write_json(path, [long_id])  # as an index written before long ids were digested holds it
    assert [(k, n) for k, n, _ in write_late(fn, Number(), registry, 0, "", [long_id])] == [(DUPLICATES, 1)]

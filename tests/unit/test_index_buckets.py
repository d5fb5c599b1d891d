"""The close's index on Dataflow's terms: a read task or a bucket writer run twice (a lost commit), the
marker only after the last bucket, a plan saved by an earlier version, ids of any length, two hours' read
tasks interleaved, an element per group of buckets, what a task holds, and an hour another run published.

The steps are called one by one, as ``tests.publishing`` does; ``tests/unit/test_late_repeats.py`` runs
them on the local runner.
"""

from __future__ import annotations

import copy
import time
import tracemalloc

from event_delivery.cloud import files
from event_delivery.contract import partitions
from tests.publishing import BucketWriter, Cell, index_reader, publish_planned
from tests.streams import WINDOW, local_keys, local_settings
from tests.unit.test_late_repeats import CLOSES_AT, SHARDS, START, Number, stage_files, write_late
from transforms import id_index, index_buckets, publish, publish_hours
from transforms.hours import shard_of
from transforms.late import WriteLatePaneFn
from transforms.reports import DELIVERED, DUPLICATES, report


def ids_of(shard: int, count: int, prefix: str = "d") -> list[str]:
    return [i for i in (f"{prefix}{n}" for n in range(10 * count + 100)) if shard_of(i, SHARDS) == shard][:count]


def planned_hour(tmp_path, registry, monkeypatch, files_of_ids: list[list[str]], ids_per_bucket: int = 100):
    """Settings and the saved plan of an hour of ``files_of_ids``, in chunks of 100 records, buckets of 100."""
    monkeypatch.setattr(id_index, "IDS_PER_CHUNK", 100)
    monkeypatch.setattr(id_index, "IDS_PER_BUCKET", ids_per_bucket)
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
    tasks = [t for t in publish.index_to_read(plan) if t["index_of_shard"] == 0]
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


def test_the_parts_wait_for_the_last_bucket_and_the_marker_for_the_last_part(tmp_path, registry, monkeypatch):
    """``WritePartsWhenIndexedFn`` counts buckets against ``buckets_planned``: until the last bucket of the
    last shard is written no part goes out (a bucket's key lists the copies a part leaves out), and
    ``PublishWhenWrittenFn`` writes no marker until the last part is written: a marker means a complete
    index and every part."""
    settings, plan = planned_hour(tmp_path, registry, monkeypatch, [ids_of(0, 100), ids_of(0, 50, "e"), ids_of(1, 3)])
    layout, reader, writer = settings.layout, index_reader(settings.layout), BucketWriter(settings.layout)
    indexed_fn, publish_fn = publish_hours.WritePartsWhenIndexedFn(layout), publish_hours.PublishWhenWrittenFn(settings)
    indexed_fn.setup()
    publish_fn.setup()
    indexed_state, publish_state = {}, {}

    def indexed(kind, count) -> list:
        cells = {name: Cell(indexed_state, name) for name in ("buckets", "indexed")}
        return list(indexed_fn.process((START, (kind, count)), **cells))

    def progress(kind, count) -> list:
        cells = {name: Cell(publish_state, name) for name in ("parts", "written")}
        return list(publish_fn.process((START, (kind, count)), **cells))

    assert indexed(publish.PLANNED, publish.buckets_planned(plan)) == []
    sent = []
    for task in publish.index_to_read(plan):
        for count in [n for group_ids in reader.process((START, task)) for _, n in writer.process(group_ids)]:
            assert sent == [], "no part before the last bucket"
            sent += indexed(publish.WRITTEN, count)
    parts = [output.value for output in sent[:-1]]
    assert [part for _, part in parts] == publish.parts_to_write(plan) and len(parts) == 3, "a part per file"
    assert sent[-1] == (START, (publish.PLANNED, 3))
    assert len(index_files(layout)) == 2 + 1, "two buckets of shard 0, one of shard 1"
    assert progress(*sent[-1][1]) == []
    markers = []
    for hour_part in parts:
        assert not files.exists(layout.marker(START)), "no marker before the last part"
        publish.write_part(layout, *hour_part)
        markers += progress(publish.WRITTEN, 1)
    assert markers == [layout.marker(START)] and files.exists(layout.marker(START))
    assert indexed_state == publish_state == {}, "each hour's keys keep nothing once it is published"


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
    assert publish.buckets_planned(plan) == 2 + 1

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


def copied(staged: str, layout, hour_start: int) -> str:
    """A copy of a staged file in the staging folder of another hour."""
    copy_path = partitions.join(layout.hour(layout.staging, hour_start), staged.rsplit("/", 1)[-1])
    files.concatenate_avro([staged], copy_path, files.UNCOMPRESSED)
    return copy_path


def without_places(elements: list) -> list:
    """A read task's elements as a task that knows no places in the plan sends them: entries alone."""
    return [
        (key, (*shape, [[entry for entry, *_ in bucket] for bucket in entries])) for key, (*shape, entries) in elements
    ]


def test_read_tasks_of_two_hours_interleaved_read_their_own_lists_never_a_plan(tmp_path, registry, monkeypatch):
    """Two hours close at once (a backlog caught up), and their read tasks reach a worker interleaved: each
    task reads its own list of files (~15 kB at 1M events/s), never its hour's plan (~40 MB), and no worker
    keeps a plan. A task of a plan saved before tasks had lists reads the plan, and sends the same."""
    settings, plan = planned_hour(tmp_path, registry, monkeypatch, [ids_of(0, 100), ids_of(0, 100, "e"), ids_of(1, 90)])
    layout, later = settings.layout, START + WINDOW
    reports = [report(DELIVERED, part["records"], copied(part["sources"][0], layout, later)) for part in plan["parts"]]
    later_plan = publish.plan_hour(layout, later, CLOSES_AT + WINDOW, reports, False, 0, SHARDS)
    tasks = {
        hour: [(hour, task) for task in publish.index_to_read(p)] for hour, p in ((START, plan), (later, later_plan))
    }
    interleaved = [hour_task for pair in zip(tasks[START], tasks[later], strict=True) for hour_task in pair]
    assert len(interleaved) == 2 * 3, "two chunks of shard 0 and one of shard 1, per hour"
    reader, read = index_reader(layout), []
    monkeypatch.setattr(files, "read_json", lambda path, real=files.read_json: read.append(path) or real(path))
    sent = [list(reader.process(hour_task)) for hour_task in interleaved]
    assert not [path for path in read if path.endswith(publish.CLOSE_PLAN)], "no task read a plan"
    lists = [
        partitions.join(layout.hour(layout.staging, hour), id_index.sources_name(task)) for hour, task in interleaved
    ]
    assert read == lists, "each task read its own list, once"

    read.clear()
    without_lists = [(hour, {k: v for k, v in task.items() if k != "chunk"}) for hour, task in interleaved]
    older = [list(reader.process(hour_task)) for hour_task in without_lists]
    assert older == [without_places(elements) for elements in sent], "an older plan's tasks send the same ids"
    assert len(read) == len(interleaved) and all(path.endswith(publish.CLOSE_PLAN) for path in read)
    for hour, hour_plan in ((START, plan), (later, later_plan)):
        publish_planned(layout, hour, hour_plan)
        left = files.glob(partitions.join(layout.hour(layout.staging, hour), id_index.SOURCES_PREFIX + "*"))
        assert left == [], "the hour's lists are deleted with its plan"


def test_a_read_task_sends_one_element_per_group_of_buckets(tmp_path, registry, monkeypatch):
    """A chunk sends one element per group of ``BUCKETS_PER_GROUP`` buckets of its shard, not one per bucket
    (81M elements an hour at 1M events/s); each group writes its buckets, the same files a late pane reads."""
    ids = [ids_of(0, 100), ids_of(0, 100, "e")]
    settings, plan = planned_hour(tmp_path, registry, monkeypatch, ids, ids_per_bucket=5)
    tasks = [task for task in publish.index_to_read(plan) if task["index_of_shard"] == 0]
    [buckets] = {task["buckets"] for task in tasks}
    assert buckets == 40 and id_index.BUCKETS_PER_GROUP == 16
    reader, writer, counts = index_reader(settings.layout), BucketWriter(settings.layout), []
    for task in tasks:
        elements = list(reader.process((START, task)))
        assert len(elements) <= buckets / id_index.BUCKETS_PER_GROUP + 1, "an element per group"
        assert [key for key, _ in elements] == [(START, 0, group) for group in range(3)]
        counts += [count for group_ids in elements for _, count in writer.process(group_ids)]
    assert counts == [16, 16, 8], "each group tells of its buckets once all chunks came"
    held = {path.rsplit("/", 1)[-1]: set(entries) for path, entries in index_files(settings.layout).items()}
    for event_id in ids[0] + ids[1]:
        name = partitions.id_index_name(0, id_index.index_bucket(event_id, SHARDS, buckets), buckets, SHARDS)
        assert [n for n, entries in held.items() if event_id in entries] == [name]


def test_a_read_task_at_the_chunk_bound_holds_under_45_mb(monkeypatch):
    """A read task of ``IDS_PER_CHUNK`` ids of 36 characters, each with its file's place in the plan, in a
    shard of 22,500 buckets (a shard-hour at 1M events/s), holds under 45 MB (42 measured; 26 before the
    places): every harness thread of a worker may run one."""
    per_file = 5_000
    monkeypatch.setattr(files, "read_event_ids", lambda source: [f"{int(source) + n:036d}" for n in range(per_file)])
    sources = [
        (str(start), [start // 2_000_000, n]) for n, start in enumerate(range(0, id_index.IDS_PER_CHUNK, per_file))
    ]
    task = {"index_of_shard": 0, "num_shards": 1, "buckets": 22_500, "chunks": 900, "chunk": 0}
    tracemalloc.start()
    try:
        elements = list(id_index.ids_by_group("unused", task, sources))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(len(entries) for _, (*_, groups) in elements for entries in groups) == id_index.IDS_PER_CHUNK
    assert len(elements) == 1_407 and peak < 45_000_000, f"{peak / 1e6:.0f} MB"


def test_a_group_whose_hour_another_run_published_meanwhile_clears_its_state(tmp_path, registry, monkeypatch):
    """Two overlapping runs: the other publishes the hour while this one's read tasks run. The tasks after
    its marker send ``PUBLISHED``, so each group still hears from every chunk, clears its key (the global
    window would keep it for good) and writes nothing over the other run's index."""
    settings, plan = planned_hour(tmp_path, registry, monkeypatch, [ids_of(0, 100), ids_of(0, 100, "e")])
    layout, reader, writer = settings.layout, index_reader(settings.layout), BucketWriter(settings.layout)
    first, second = [task for task in publish.index_to_read(plan) if task["index_of_shard"] == 0]
    for group_ids in reader.process((START, first)):
        assert writer.process(group_ids) == []
    files.write_json(layout.marker(START), plan["manifest"])  # the other run's
    sent = list(reader.process((START, second)))
    assert [entries for _, (*_, entries) in sent] == [index_buckets.PUBLISHED], "nothing read"
    assert [writer.process(group_ids) for group_ids in sent] == [[(START, 2)]]
    assert writer.state[(START, 0, 0)] == {} and index_files(layout) == {}, "cleared, nothing written"


def test_the_close_saves_the_read_tasks_lists_side_by_side(monkeypatch):
    """At 1M events/s an hour has ~14,400 read tasks: their lists are written many at a time, not one after
    another in the close's work item (minutes at ~40 ms a write); every task with files gets its list."""
    staged = {f"/staging/service_log-run1-p{n:05d}-s{n % SHARDS:03d}.avro": 1 for n in range(64)}
    monkeypatch.setattr(id_index, "IDS_PER_CHUNK", 1)
    tasks = id_index.index_tasks(staged, SHARDS)
    running, most, written = [0], [0], {}

    def slow_write(path, document):
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.02)
        written[path] = document
        running[0] -= 1

    monkeypatch.setattr(files, "write_json", slow_write)
    id_index.save_task_sources("/staging", tasks, {path: [0, n] for n, path in enumerate(staged)})
    assert sorted(written) == sorted(f"/staging/{id_index.sources_name(task)}" for task in tasks)
    assert all(written[f"/staging/{id_index.sources_name(task)}"] for task in tasks), "a file each"
    assert most[0] > 1, "written side by side"

"""Repeats dropped at the close: the index's keys see every copy of their ids, whatever file, pane or run
staged them, keep the first in plan order and list the others; the parts, written after the last bucket,
leave those out, and the marker counts them as duplicates.

Invariants, not examples: every id is published once, in the part of its first copy; ``in`` stays what the
plan counted and equals ``delivered + duplicates``; each file holds what the manifest says it holds. Run
step by step (``tests.publishing``), on the local runner (``PublishHours``), and with a crash between any
two changes to the files (``tests/unit/test_close_retries.py``'s ``Runner``).
"""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from event_delivery.cloud import files
from event_delivery.contract import partitions
from tests.publishing import publish_planned
from tests.streams import local_keys, local_settings
from tests.unit.test_close_retries import Runner, crash_after, crashes, hour_settings, stage
from tests.unit.test_late_repeats import CLOSES_AT, SHARDS, START, event, ids_of_shard, run_publish_hours, stage_files
from transforms import close, close_repeats, id_index, leftover_hours, publish
from transforms.records import event_record
from transforms.reports import DELIVERED, DUPLICATES, report


@settings(max_examples=200, deadline=None)
@given(st.sets(st.tuples(st.sampled_from("abcd"), st.integers(0, 3), st.integers(0, 3)), max_size=30))
def test_of_every_entry_the_first_copy_in_plan_order_is_kept_and_every_other_listed_once(copies):
    copies = list(copies)  # a pane holds an id once: no two copies share a place
    later = close_repeats.later_copies(copies)
    listed = [(entry, part, place) for part, copies_of_part in later.items() for place, entry in copies_of_part]
    assert len(listed) == len(set(listed)) and set(listed) <= set(copies)
    kept = set(copies) - set(listed)
    for entry in {entry for entry, _, _ in copies}:
        places = sorted((part, place) for e, part, place in copies if e == entry)
        assert [(part, place) for e, part, place in kept if e == entry] == places[:1], entry


def long_ids(shard: int, count: int) -> list[str]:
    """Ids past ``MAX_ENTRY_BYTES``, which the index holds by their digests."""
    ids = (("x" * 70) + str(n) for n in range(10_000))
    return [i for i in ids if id_index.shard_of(i, SHARDS) == shard][:count]


def repeating_files() -> list[list[str]]:
    """Staged files whose ids repeat across files of one shard (two runs', or two writers'), and within
    none: long ids too, and more ids than a chunk or a bucket holds."""
    first, second = ids_of_shard(0, 150, "d"), ids_of_shard(1, 40, "d")
    long = long_ids(0, 4)
    return [
        first[:100] + long[:2],
        first[60:150] + long[1:3],  # 40 ids and a long one again
        second,
        second[10:20] + ids_of_shard(1, 5, "n"),
        first[:5] + long[2:],
    ]


def publish_an_hour_of(tmp_path, registry, monkeypatch, files_of_ids, target_file_mb: int) -> tuple:
    """Settings and the saved plan of an hour of ``files_of_ids``, in chunks of 100 records, buckets of 10
    ids and groups of 2 buckets: many keys, and copies of an id that reach its key from several chunks."""
    monkeypatch.setattr(id_index, "IDS_PER_CHUNK", 100)
    monkeypatch.setattr(id_index, "IDS_PER_BUCKET", 10)
    monkeypatch.setattr(id_index, "BUCKETS_PER_GROUP", 2)
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    reports = [*stage_files(settings, registry, files_of_ids), report(DUPLICATES, 3)]
    return settings, publish.plan_hour(settings.layout, START, CLOSES_AT, reports, False, target_file_mb, SHARDS)


def first_parts(plan: dict, ids_of: dict[str, list[str]]) -> dict[str, str]:
    """The part of each id's first copy in plan order, of staged files whose ids ``ids_of`` holds."""
    first = {}
    for part in plan["parts"]:
        for source in part["sources"]:
            for event_id in ids_of[source]:
                first.setdefault(event_id, part["path"])
    return first


def check_each_id_published_once(layout, ids_of: dict[str, list[str]], plan: dict, counted: int) -> None:
    """Every staged id once, in the part of its first copy in plan order; the accounting adds up (``counted``
    duplicates reported while the hour was open); each file holds what the manifest says; nothing of the
    close is left in staging."""
    manifest = files.read_json(layout.marker(START))
    held = {f["path"]: files.read_event_ids(f["path"]) for f in manifest["files"]}
    published = [i for ids in held.values() for i in ids]
    staged = [i for ids in ids_of.values() for i in ids]
    assert sorted(published) == sorted(set(staged)) and len(published) < len(staged), "each id once"
    first = first_parts(plan, ids_of)
    assert all(event_id in held[path] for event_id, path in first.items()), "in the part of its first copy"
    accounting = manifest["accounting"]
    assert accounting["in"] == plan["manifest"]["accounting"]["in"] == len(staged) + counted
    assert accounting["delivered"] == len(published)
    assert accounting["duplicates"] == len(staged) - len(published) + counted
    assert {path: len(ids) for path, ids in held.items()} == {f["path"]: f["records"] for f in manifest["files"]}
    assert not files.glob(partitions.join(layout.hour(layout.staging, START), "*")), "staging is empty"


def staged_ids(plan: dict) -> dict[str, list[str]]:
    return {source: files.read_event_ids(source) for part in plan["parts"] for source in part["sources"]}


@pytest.mark.parametrize("target_file_mb", [0, 1], ids=["a part per file", "one part"])
def test_an_hour_whose_files_repeat_ids_publishes_each_once_and_counts_the_rest(
    tmp_path, registry, monkeypatch, target_file_mb
):
    settings, plan = publish_an_hour_of(tmp_path, registry, monkeypatch, repeating_files(), target_file_mb)
    ids_of = staged_ids(plan)
    publish_planned(settings.layout, START, plan)
    check_each_id_published_once(settings.layout, ids_of, plan, counted=3)


def test_the_local_runner_writes_the_parts_after_the_index_and_drops_the_repeats(tmp_path, registry, monkeypatch):
    settings, plan = publish_an_hour_of(tmp_path, registry, monkeypatch, repeating_files(), 0)
    ids_of = staged_ids(plan)
    run_publish_hours(settings, plan)
    check_each_id_published_once(settings.layout, ids_of, plan, counted=3)


def test_a_close_with_repeats_crashed_between_any_two_steps_publishes_each_id_once(tmp_path, registry, monkeypatch):
    """Two runs staged copies of the same ids (a restart mid-hour), and the close crashes after each change
    to the files in turn: the retried close publishes each id once, and counts the others once. The hour's
    count of buckets and its parts run as soon as they are sent, before any bucket the close's read tasks
    send: on Dataflow, the steps run side by side, and only the count keeps the parts after the index."""
    monkeypatch.setattr(close, "wall_clock", lambda: CLOSES_AT + 1)
    settings = hour_settings(tmp_path / "hour", registry, "run2")
    ids = ids_of_shard(0, 9, "a")
    staged = [("run1", 0, ids[:6]), ("run2", 0, ids[3:]), ("run2", 1, ids[::2])]
    crashed, change = True, 0
    while crashed:
        change += 1
        shutil.rmtree(tmp_path / "hour", ignore_errors=True)
        runner = Runner(settings, eager=("indexed", "part"))
        reports = [stage(settings, run, number, 0, ids=of_file) for run, number, of_file in staged]
        runner.arrive(*reports[1:])  # the first, the stopped run's, the close finds by itself
        runner.fire_close()
        with monkeypatch.context() as patch:
            changes = crash_after(patch, change)
            crashed = crashes(runner)
            runner.run()  # the retry
        [plan, *_] = [doc for name, path, doc in changes if name == "write_json" and path.endswith(publish.CLOSE_PLAN)]
        ids_of = {path: of_file for (_, _, path), (_, _, of_file) in zip(reports, staged, strict=True)}
        check_each_id_published_once(settings.layout, ids_of, plan, counted=0)
        assert runner.markers == [settings.layout.marker(START)], "the hour is published once"
    assert change > 10, "the close changes the files more often than that"


def test_a_stale_part_attempt_that_straddles_the_finish_never_writes_the_copies_over_the_part(
    tmp_path, registry, monkeypatch
):
    """Dataflow may run a stale attempt at a part beside the one whose commit counted: one that found no
    marker, then reads its lists once the finish deleted them, would write every copy over the published
    part. The finish deletes the staged files first, so such an attempt fails and its retry finds the marker."""
    settings, plan = publish_an_hour_of(tmp_path, registry, monkeypatch, repeating_files(), 0)
    ids_of, layout = staged_ids(plan), settings.layout
    stale = publish.parts_to_write(plan)[1]  # its file repeats ids of the first
    remove_notes, failed = publish.remove_close_notes, []

    def remove_while_a_stale_attempt_runs(staging):
        remove_notes(staging)
        marker = layout.marker(START)
        os.rename(marker, marker + ".aside")  # the attempt looked before the marker was written
        try:
            publish.write_part(layout, START, stale)
        except Exception as error:  # noqa: BLE001 - what the runner would retry
            failed.append(error)
        finally:
            os.rename(marker + ".aside", marker)

    monkeypatch.setattr(publish, "remove_close_notes", remove_while_a_stale_attempt_runs)
    publish_planned(layout, START, plan)
    assert failed, "the stale attempt found no sources"
    check_each_id_published_once(layout, ids_of, plan, counted=3)


@pytest.mark.parametrize("cancelled_after", range(1, 6))
def test_a_restart_after_a_cancelled_close_moves_its_copies_late_only_checked(
    tmp_path, registry, monkeypatch, cancelled_after
):
    """Run 1 saved its plan and was cancelled before its marker. Run 2, which reads nothing at start, stages
    its own copies of run 1's ids (redeliveries) and a new id; its close finds the saved plan, so its pane is
    not in it: the pane waits for the marker, and goes late less the ids the hour holds."""
    monkeypatch.setattr(close, "wall_clock", lambda: CLOSES_AT + 1)
    first, second = (hour_settings(tmp_path, registry, run) for run in ("run1", "run2"))
    ids = ids_of_shard(0, 5, "a")
    cancelled = Runner(first)
    cancelled.arrive(stage(first, "run1", 0, 0, ids=ids[:4]))
    cancelled.fire_close()
    cancelled.run(items=1 + cancelled_after)  # its report, its close (the plan), and a few steps more
    assert not files.exists(first.layout.marker(START))

    resumed = Runner(second)
    left_over = [r.value for r in leftover_hours.AnnounceLeftoverHoursFn(second).process(None)]
    resumed.arrive(*left_over, stage(second, "run2", 0, 0, ids=[ids[1], ids[3], ids[4]]))
    resumed.fire_close()
    resumed.run()

    layout = first.layout
    delivered = sorted(
        i for path in files.glob(f"{layout.hour(layout.delivered, START)}/*.avro") for i in files.read_event_ids(path)
    )
    late = sorted(
        i for path in files.glob(f"{layout.hour(layout.late, START)}/*.avro") for i in files.read_event_ids(path)
    )
    assert (delivered, late) == (sorted(ids[:4]), [ids[4]]), "each id once, delivered or late"
    assert partitions.late_duplicates(layout, START) == 2


def test_repeats_of_this_run_are_dropped_in_a_chunk_beside_a_file_of_another_shard_count(tmp_path, registry):
    """After a drain and a deploy with another shard count, an old run's file names shard 0 and holds ids of
    other shards: the index of the hour is skipped (late panes go unchecked, counted), but the ids of the
    task's own shard are still sent, so this run's repeats in that chunk are dropped."""
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), num_shards=SHARDS)
    layout, schema = settings.layout, registry["service_log"].parsed_delivered_schema
    staging = layout.hour(layout.staging, START)
    old_ids = [i for i in (f"o{n}" for n in range(100)) if id_index.shard_of(i, 3) == 0][:5]  # of 3 shards
    assert any(id_index.shard_of(i, SHARDS) == 1 for i in old_ids)
    old = partitions.join(staging, partitions.pane_file_name("service_log", "oldrun", 0, 0, "w9"))
    files.write_avro(old, schema, [event_record(event(registry, i)) for i in old_ids], files.UNCOMPRESSED)
    [repeated] = ids_of_shard(0, 1, "x")
    reports = [report(DELIVERED, len(old_ids), old)]
    for number, writer in ((0, "w1"), (1, "w2")):  # two writers' panes
        path = partitions.join(staging, partitions.pane_file_name("service_log", settings.run_id, number, 0, writer))
        files.write_avro(path, schema, [event_record(event(registry, repeated))], files.UNCOMPRESSED)
        reports.append(report(DELIVERED, 1, path))
    plan = publish.plan_hour(layout, START, CLOSES_AT, reports, False, 0, SHARDS)
    manifest = publish_planned(layout, START, plan)

    published = [i for f in manifest["files"] for i in files.read_event_ids(f["path"])]
    assert sorted(published) == sorted([*old_ids, repeated]) and manifest["accounting"]["duplicates"] == 1
    assert files.glob(partitions.join(layout.hour(layout.id_index, START), "*skipped*")), "the index is skipped"

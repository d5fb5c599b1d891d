"""The close of an hour on Dataflow's terms: every step may run twice, a crash may fall between
any two steps (or a job be cancelled there), and reports keep arriving meanwhile.

``Runner`` plays Dataflow for one hour: it runs the close's work items (``CloseHourFn``'s
reports and timer, the index's ``ReadIndexChunkFn`` and ``WriteIndexBucketFn``,
``WritePartsWhenIndexedFn``, ``WritePartFn``, ``PublishWhenWrittenFn``) one at a time, and commits an
item's state and outputs only if it finishes. A crash leaves what the item did to the files and loses the
rest, and the item is run again: a lost commit.
"""

from __future__ import annotations

import collections
import copy
import shutil

import pytest
from apache_beam.pvalue import TaggedOutput
from apache_beam.transforms.window import IntervalWindow
from google.api_core import exceptions as google_errors

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.partitions import Layout
from tests.messages import valid_fields
from tests.publishing import Cell, index_reader
from tests.streams import LATENESS, START, TRIGGER, WINDOW, local_settings
from transforms import close, index_buckets, late, leftover_hours, publish, publish_hours
from transforms.hours import shard_of
from transforms.records import event_record
from transforms.reports import DELIVERED, DUPLICATES, LEFT_OVER, report

CLOSES_AT = START + WINDOW + LATENESS
MOVE_LATE_STATE = ("waiting", "since", "move_late")
WINDOW_OF_THE_HOUR = IntervalWindow(START, CLOSES_AT)


class Crash(Exception):
    """The worker died: what the work item did to the files stays, its commit is lost."""


class Runner:
    """Dataflow, for the close of the hour at ``START`` in one run of the job."""

    def __init__(self, settings, eager: tuple[str, ...] = ()):
        """``eager`` names the steps whose work items run before any other pending one: as Dataflow, which
        runs the steps side by side, may run them."""
        self.eager = eager
        self.close_hour = close.CloseHourFn(settings)
        self.read_chunk = index_reader(settings.layout)
        self.write_bucket = index_buckets.WriteIndexBucketFn(settings.layout)
        self.parts_when_indexed = publish_hours.WritePartsWhenIndexedFn(settings.layout)
        self.write_part = publish_hours.WritePartFn(settings.layout)
        self.publish_hour = publish_hours.PublishWhenWrittenFn(settings)
        for fn in (self.close_hour, self.write_bucket, self.parts_when_indexed, self.write_part, self.publish_hour):
            fn.setup()
        self.state = {"close": {}, "indexed": {}, "publish": {}}  # per key (the hour's, a bucket's): what is committed
        self.pending = collections.deque()  # work items, in order
        self.markers = []  # what the job outputs: the paths of the markers it wrote

    def arrive(self, *hour_reports):
        """Reports that arrive now, before the retry of whatever failed."""
        self.pending.extendleft(("report", r) for r in reversed(hour_reports))

    def fire_close(self):
        self.pending.append(("close", None))

    def run(self, items: int | None = None):
        """Runs the work items until none is left (or ``items`` of them); a crash propagates, and its
        item stays pending."""
        while (self.pending or self.look_for_the_marker()) and items != 0:
            items = None if items is None else items - 1
            first = next((n for n, (step, _) in enumerate(self.pending) if step in self.eager), 0)
            step, element = self.pending[first]
            key = {"indexed": "indexed", "progress": "publish", "bucket": element and element[0]}.get(step, "close")
            values = copy.deepcopy(self.state.get(key, {}))
            outputs = list(self._run(step, element, values))
            self.state[key] = values
            del self.pending[first]
            self.pending.extend(outputs)

    def look_for_the_marker(self) -> bool:
        """Once nothing else is pending, the clock moves on and the close's timer that looks for the marker, if
        set, fires: a work item of its own."""
        if self.state["close"].pop("move_late", None) is None:
            return False
        self.pending.append(("move_late", None))
        return True

    def _run(self, step, element, values):
        close_state = {
            "reports": Cell(values, "reports", []),
            "closed": Cell(values, "closed"),
            "late_counts": Cell(values, "late_counts"),
            "waiting": Cell(values, "waiting", []),
            "since": Cell(values, "since"),
            "move_late": Cell(values, "move_late"),
        }
        if step == "report":
            self.close_hour.process((START, element), WINDOW_OF_THE_HOUR, close=Cell(values, "close"), **close_state)
        elif step == "move_late":
            self.close_hour.move_late_once_published(WINDOW_OF_THE_HOUR, *(close_state[k] for k in MOVE_LATE_STATE))
        elif step == "close":
            close_again = Cell(values, "close_again")
            for output in self.close_hour.close_when_due(WINDOW_OF_THE_HOUR, close_again=close_again, **close_state):
                yield ("task", output.value) if isinstance(output, TaggedOutput) else ("indexed", output)
        elif step == "task":
            yield from (("bucket", bucket_ids) for bucket_ids in self.read_chunk.process(element))
        elif step == "bucket":
            entries, chunks = Cell(values, "entries", []), Cell(values, "chunks")
            yield from (
                ("indexed", (hour, (publish.WRITTEN, buckets)))
                for hour, buckets in self.write_bucket.process(element, entries, chunks)
            )
        elif step == "indexed":
            buckets, indexed = Cell(values, "buckets"), Cell(values, "indexed")
            for output in self.parts_when_indexed.process(element, buckets=buckets, indexed=indexed):
                yield ("part", output.value) if isinstance(output, TaggedOutput) else ("progress", output)
        elif step == "part":
            yield from (("progress", progress) for progress in self.write_part.process(element))
        else:
            parts, written = Cell(values, "parts"), Cell(values, "written")
            self.markers += self.publish_hour.process(element, parts=parts, written=written)


def crash_after(monkeypatch, change: int) -> list:
    """The worker dies right after the ``change``-th change to the files (a write or a delete);
    returns every change made, as (function, what it changed, the JSON document it wrote)."""
    changes = []
    for name in ("write_json", "concatenate_avro", "delete_existing"):

        def changing(first, *more, _real=getattr(files, name), _name=name):
            result = _real(first, *more)
            changed = more[0] if _name == "concatenate_avro" else first  # sources, destination
            changes.append((_name, changed, more[0] if _name == "write_json" else None))
            if len(changes) == change:
                raise Crash(f"after {_name} {changed}")
            return result

        monkeypatch.setattr(files, name, changing)
    return changes


def stage(settings, run_id: str, number: int, records: int, ids: list[str] | None = None) -> tuple:
    """A pane file the writer staged for the hour, as it reports it; its ids ``run-number-i``, or ``ids``."""
    log = settings.event_type
    ids = ids or [f"{run_id}-{number}-{i}" for i in range(records)]
    events = [(event_id, (START + 1) * 1000, valid_fields(log, i)) for i, event_id in enumerate(ids)]
    path = partitions.join(
        settings.layout.hour(settings.layout.staging, START), partitions.pane_file_name(log.name, run_id, number, 0)
    )
    files.write_avro(path, log.parsed_delivered_schema, [event_record(e) for e in events], files.UNCOMPRESSED)
    return report(DELIVERED, len(ids), path)


def hour_settings(root, registry, run_id: str):
    return local_settings(root, registry["service_log"], None, run_id, target_file_mb=0)  # a part per pane


def written(layout: Layout, root: str) -> list[str]:
    """The ids of the hour's records in ``root``'s hour folder, one entry per record."""
    paths = files.glob(partitions.join(layout.hour(root, START), "*.avro"))
    return sorted(record["event_id"] for path in paths for record in files.read_avro(path))


def check_the_published_hour(layout: Layout, changes: list, staged_ids: list, duplicates: int) -> dict:
    """Every staged record published or late, once; the marker written once and kept as first
    planned; staging empty; every duplicate counted once. Returns the manifest."""
    marker = layout.marker(START)
    plans = [doc for name, path, doc in changes if name == "write_json" and path.endswith(publish.CLOSE_PLAN)]
    manifest = files.read_json(marker)
    assert manifest == plans[0]["manifest"], "the first plan's manifest is the one published"
    assert [path for name, path, _ in changes if path == marker] == [marker], "the marker is written once"
    published = files.glob(partitions.join(layout.hour(layout.delivered, START), "*"))
    assert published == sorted([marker] + [f["path"] for f in manifest["files"]]), "nothing more in the folder"
    assert sorted(written(layout, layout.delivered) + written(layout, layout.late)) == sorted(staged_ids)
    assert manifest["accounting"]["delivered"] == len(written(layout, layout.delivered))
    assert manifest["accounting"]["duplicates"] + partitions.late_duplicates(layout, START) == duplicates
    assert not files.glob(partitions.join(layout.hour(layout.staging, START), "*")), "staging is empty"
    return manifest


@pytest.fixture(autouse=True)
def the_hour_is_over_by_the_clock(monkeypatch):
    monkeypatch.setattr(close, "wall_clock", lambda: CLOSES_AT + TRIGGER)


def test_each_step_of_the_close_run_twice_does_what_it_does_once(tmp_path, registry):
    settings = hour_settings(tmp_path, registry, "run1")
    layout = settings.layout
    reports = [stage(settings, "run1", n, n + 1) for n in range(3)] + [report(DUPLICATES, 2)]
    late_pane = stage(settings, "run1", 3, 1)

    plans = [publish.plan_hour(layout, START, CLOSES_AT, reports, False, 1) for _ in range(2)]
    assert plans[0] == plans[1]
    for part in publish.parts_to_write(plans[0]):
        publish.write_part(layout, START, part)
        publish.write_part(layout, START, part)
    manifests = [publish.finish_hour(layout, START) for _ in range(2)]  # the second: the plan is gone
    assert manifests[0] == manifests[1] == plans[0]["manifest"] == files.read_json(layout.marker(START))
    destination = partitions.join(layout.hour(layout.late, START), "late.avro")
    for _ in range(2):
        late.move_late_checked(layout, START, late_pane[2], destination, settings.num_shards, settings.codec)
    assert written(layout, layout.late) == ["run1-3-0"] and not files.exists(late_pane[2])
    assert publish.plan_hour(layout, START, CLOSES_AT, reports, False, 1) is None, "published: nothing to plan"


def test_a_close_crashed_between_any_two_steps_and_retried_publishes_the_hour_once(tmp_path, registry, monkeypatch):
    """After a crash after each change to the files in turn, with a pane that arrives before the
    retry: the retried close publishes what it first planned, and the pane goes to the late root."""
    settings = hour_settings(tmp_path / "hour", registry, "run1")
    staged_ids = [f"run1-{n}-{i}" for n in range(4) for i in range(n + 1 if n < 3 else 2)]
    crashed, change = True, 0
    while crashed:
        change += 1
        shutil.rmtree(tmp_path / "hour", ignore_errors=True)
        runner = Runner(settings)
        runner.arrive(*[stage(settings, "run1", n, n + 1) for n in range(3)], report(DUPLICATES, 2))
        runner.fire_close()
        with monkeypatch.context() as patch:
            changes = crash_after(patch, change)
            crashed = crashes(runner)
            runner.arrive(stage(settings, "run1", 3, 2), report(DUPLICATES, 1))  # a pane, and its repeats
            crashed = crashes(runner) or crashed
            runner.run()  # the retry, if the crash fell after the close

        manifest = check_the_published_hour(settings.layout, changes, staged_ids, 2 + 1)
        late_pane = 0 if change < plan_saved_at(changes) else 2  # the plan, not the read tasks' lists, commits
        assert manifest["accounting"]["delivered"] == 1 + 2 + 3 + 2 - late_pane, f"crashed after change {change}"
        assert runner.markers == [settings.layout.marker(START)], "the hour is published once"
    assert change > 6, "the close changes the files more often than that"


def plan_saved_at(changes: list) -> int:
    """The number of the change that saved the plan (the read tasks' lists come before it)."""
    return next(n for n, (name, path, _) in enumerate(changes, 1) if name == "write_json" and path == plan_of(path))


def plan_of(path: str) -> str:
    return path.rsplit("/", 1)[0] + "/" + publish.CLOSE_PLAN


def crashes(runner: Runner) -> bool:
    try:
        runner.run()
    except Crash:
        return True
    return False


def test_a_run_cancelled_between_any_two_steps_of_a_close_leaves_an_hour_the_next_run_publishes_once(
    tmp_path, registry, monkeypatch
):
    """The next run stages a pane of its own for the hour, and finds one the cancelled run staged
    as it stopped, whose report was lost with it: both go to the late root, whether the cancelled
    run saved its plan, wrote some parts, wrote the marker, or finished."""
    first, second = (hour_settings(tmp_path / "hour", registry, run) for run in ("run1", "run2"))
    staged_ids = [f"run1-{n}-{i}" for n in range(4) for i in range(n + 1 if n < 3 else 1)] + ["run2-0-0", "run2-0-1"]
    crashed, change = True, 0
    while crashed:
        change += 1
        shutil.rmtree(tmp_path / "hour", ignore_errors=True)
        cancelled = Runner(first)
        cancelled.arrive(*[stage(first, "run1", n, n + 1) for n in range(3)], report(DUPLICATES, 2))
        cancelled.fire_close()
        with monkeypatch.context() as patch:
            changes = crash_after(patch, change)
            crashed = crashes(cancelled)  # and the job is cancelled
            stage(first, "run1", 3, 1)  # as it stopped; its report is lost
            resumed = Runner(second)
            left_over = list(leftover_hours.AnnounceLeftoverHoursFn(second).process(None))
            assert [r.timestamp for r in left_over] == [START], "the next run's start-up finds the hour"
            resumed.arrive(*[r.value for r in left_over], stage(second, "run2", 0, 2), report(DUPLICATES, 1))
            resumed.fire_close()
            crashed = crashes(resumed) or crashed  # once the cancelled run gets through, crash this one
            resumed.run()

        counted = 2 if change >= plan_saved_at(changes) else 0  # a run cancelled before its plan loses its counts
        check_the_published_hour(first.layout, changes, staged_ids, counted + 1)
    assert change > 6, "the close changes the files more often than that"


def test_a_left_over_report_that_reaches_an_hour_this_run_is_publishing_leaves_the_plan_alone(tmp_path, registry):
    """The start-up's report of an hour comes before its close (it holds the watermark); were it
    to come after, the files of the plan the run is publishing are not the earlier runs' to clear."""
    settings = hour_settings(tmp_path, registry, "run2")
    left_by_run1 = stage(settings, "run1", 0, 2)
    runner = Runner(settings)
    runner.arrive(stage(settings, "run2", 0, 1), report(LEFT_OVER, 0))
    runner.fire_close()
    runner.run(items=3)  # closed, with its plan saved; no part written yet
    runner.arrive(report(LEFT_OVER, 0))
    runner.run()

    manifest = files.read_json(settings.layout.marker(START))
    assert written(settings.layout, settings.layout.delivered) == ["run1-0-0", "run1-0-1", "run2-0-0"]
    assert [f["records"] for f in manifest["files"]] == [2, 1] and not files.exists(left_by_run1[2])


def test_a_pane_staged_before_the_close_that_reaches_it_after_goes_late_less_the_hours_ids(tmp_path, registry):
    """A step between the write and the close may lag: a pane staged while the hour was open by its
    own step's watermark reaches the close after it. Its copies of delivered ids go no further."""
    settings = hour_settings(tmp_path, registry, "run1")
    runner = Runner(settings)
    runner.arrive(stage(settings, "run1", 0, 3))
    runner.fire_close()
    runner.run()
    assert runner.markers, "published, with its index"
    runner.arrive(stage(settings, "run1", 1, 0, ids=["run1-0-1", "new"]))
    runner.run()
    assert written(settings.layout, settings.layout.delivered) == ["run1-0-0", "run1-0-1", "run1-0-2"]
    assert written(settings.layout, settings.layout.late) == ["new"]
    assert partitions.late_duplicates(settings.layout, START) == 1


@pytest.mark.parametrize("arrives_after", range(1, 9))
def test_a_pane_staged_while_the_hour_publishes_waits_for_its_marker_and_goes_late_less_the_hours_ids(
    tmp_path, registry, arrives_after
):
    """A pane that reaches the close after its plan, before its marker (a late pane staged then, or this run's
    after a cancelled run's close): the index is not complete until the marker, so the pane waits for it in
    the close's state, and then moves late less the ids the hour holds, at whatever step it arrived."""
    settings = hour_settings(tmp_path, registry, "run1")
    ids = [i for i in (f"e{n}" for n in range(100)) if shard_of(i, settings.num_shards) == 0][:6]  # as staged
    runner = Runner(settings)
    runner.arrive(stage(settings, "run1", 0, 0, ids=ids[:3]), stage(settings, "run1", 1, 0, ids=ids[3:5]))
    runner.fire_close()
    runner.run(items=2 + arrives_after)
    assert runner.markers == [], "the pane arrives before the marker"
    runner.arrive(stage(settings, "run1", 2, 0, ids=[ids[1], ids[3], ids[5]]))
    runner.run(items=1)
    assert runner.look_for_the_marker(), "the pane waits, and the close looks for the marker on the clock"
    runner.pending.rotate(1)  # the clock's timer fires before the close's next step
    runner.run(items=1)
    assert written(settings.layout, settings.layout.late) == [], "no marker yet: the pane waits on"
    runner.run()
    assert written(settings.layout, settings.layout.delivered) == sorted(ids[:5])
    assert written(settings.layout, settings.layout.late) == [ids[5]] and runner.markers
    assert partitions.late_duplicates(settings.layout, START) == 2
    assert not files.glob(partitions.join(settings.layout.hour(settings.layout.staging, START), "*")), (
        "staging is empty"
    )


def test_a_late_move_denied_for_good_leaves_its_file_staged_and_the_close_goes_on(tmp_path, registry, monkeypatch):
    settings = hour_settings(tmp_path, registry, "run1")
    runner = Runner(settings)
    runner.arrive(stage(settings, "run1", 0, 3))
    runner.fire_close()
    runner.run()
    concatenate = files.concatenate_avro

    def denied(sources, destination, *more):
        if destination.startswith(settings.layout.late):
            raise google_errors.Forbidden("no right to write the late root")
        return concatenate(sources, destination, *more)

    monkeypatch.setattr(files, "concatenate_avro", denied)
    late_pane = stage(settings, "run1", 1, 0, ids=["new"])
    runner.arrive(late_pane)
    runner.run()  # no error reaches the runner, which would retry it for good
    assert files.exists(late_pane[2]) and written(settings.layout, settings.layout.late) == []
    assert written(settings.layout, settings.layout.delivered) == ["run1-0-0", "run1-0-1", "run1-0-2"]


class Tally:
    """A counter the test reads: what ``inc`` added up to."""

    def __init__(self):
        self.total = 0

    def inc(self, n: int = 1):
        self.total += n


def test_a_left_over_report_after_this_runs_close_moves_only_other_runs_files(tmp_path, registry):
    """A pane this run stages after it closed the hour goes late on its own report, which is on
    its way: the clear-up after the marker is for files whose runs stopped, and taking this run's
    too would count its records late twice."""
    settings = hour_settings(tmp_path, registry, "run2")
    runner = Runner(settings)
    runner.arrive(stage(settings, "run2", 0, 1))
    runner.fire_close()
    runner.run()
    runner.close_hour.late_files.late = late = Tally()
    left_by_run1 = stage(settings, "run1", 0, 1)  # as that run stopped after the close; its report lost
    own_late_pane = stage(settings, "run2", 1, 2)
    runner.arrive(report(LEFT_OVER, 0))
    runner.run()

    layout = settings.layout
    assert written(layout, layout.late) == ["run1-0-0"] and not files.exists(left_by_run1[2])
    assert files.exists(own_late_pane[2]), "this run's pane waits for its report"
    runner.arrive(own_late_pane)
    runner.run()
    assert written(layout, layout.late) == ["run1-0-0", "run2-1-0", "run2-1-1"]
    assert not files.glob(partitions.join(layout.hour(layout.staging, START), "*")), "staging is empty"
    assert late.total == 3, "each late record counted once"


def test_a_close_that_finds_the_hour_published_by_an_overlapping_run_moves_what_it_collected_late(tmp_path, registry):
    """Two runs overlap (a restart before the old one stopped): run 2 collects a pane before run 1
    publishes the hour, and one after; its own close then finds the marker and no plan."""
    first, second = (hour_settings(tmp_path, registry, run) for run in ("run1", "run2"))
    overlapping = Runner(second)
    overlapping.arrive(stage(second, "run2", 0, 2))
    overlapping.run()
    old = Runner(first)
    old.arrive(stage(first, "run1", 0, 1))
    old.fire_close()
    old.run()
    overlapping.arrive(stage(second, "run2", 1, 1))
    overlapping.fire_close()
    overlapping.run()

    layout = first.layout
    assert written(layout, layout.delivered) == ["run1-0-0", "run2-0-0", "run2-0-1"], "run 1 took run 2's first"
    assert written(layout, layout.late) == ["run2-1-0"]
    assert overlapping.markers == [] and not files.glob(partitions.join(layout.hour(layout.staging, START), "*"))

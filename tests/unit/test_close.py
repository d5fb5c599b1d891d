"""Closing an hour: a close that fails halfway and runs again publishes the same hour, compacted."""

from __future__ import annotations

import fastavro
import pytest
from apache_beam.io.filesystem import BeamIOError
from apache_beam.transforms.window import IntervalWindow
from google.api_core import exceptions as google_errors

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.partitions import Layout
from tests.messages import valid_fields
from tests.streams import LATENESS, START, WINDOW, local_keys, local_settings
from transforms import close
from transforms import publish as publish_hour
from transforms.records import event_record
from transforms.reports import DELIVERED, DUPLICATES, report

CLOSES_AT = START + WINDOW + LATENESS


def stage(layout: Layout, registry, count: int) -> list[tuple]:
    """``count`` staged pane files of the hour, as the writer reports them."""
    log = registry["service_log"]
    folder = layout.hour(layout.staging, START)
    reports = []
    for number in range(count):
        events = [(f"e{number}-{i}", (START + 1) * 1000, valid_fields(log, i)) for i in range(number + 1)]
        path = partitions.join(folder, partitions.pane_file_name("service_log", "run1", number, 0))
        files.write_avro(path, log.parsed_delivered_schema, [event_record(e) for e in events], files.UNCOMPRESSED)
        reports.append(report(DELIVERED, len(events), path))
    return reports


def publish(layout: Layout, reports: list, target_file_mb: int) -> dict:
    """What ``CloseHour`` and ``PublishHours`` do with an hour, one step after the other."""
    plan = publish_hour.plan_hour(layout, START, CLOSES_AT, reports, False, target_file_mb)
    for part in publish_hour.parts_to_write(plan):
        publish_hour.write_part(layout, START, part)
    return publish_hour.finish_hour(layout, START)


def published_ids(layout: Layout, manifest: dict) -> list[str]:
    return sorted(r["event_id"] for f in manifest["files"] for r in files.read_avro(f["path"]))


@pytest.mark.parametrize("target_file_mb", [0, 1])
def test_a_close_retried_after_a_crash_publishes_the_same_files_and_manifest(
    tmp_path, registry, monkeypatch, target_file_mb
):
    layout = Layout.under(tmp_path, "service_log", WINDOW)
    reports = stage(layout, registry, 3) + [report(DUPLICATES, 2, None)]
    staged_ids = sorted(r["event_id"] for _, _, path in reports[:3] for r in files.read_avro(path))

    write_part = publish_hour.write_part

    def crash_after_the_first_part(layout, hour_start, part):
        write_part(layout, hour_start, part)
        raise OSError("the worker died")

    monkeypatch.setattr(publish_hour, "write_part", crash_after_the_first_part)
    with pytest.raises(OSError):
        publish(layout, reports, target_file_mb)
    monkeypatch.setattr(publish_hour, "write_part", write_part)
    assert not files.exists(layout.marker(START))
    first_plan = files.read_json(partitions.join(layout.hour(layout.staging, START), publish_hour.CLOSE_PLAN))

    # The retry's listing no longer finds a moved file, as a fresh close would not either.
    still_staged = [r for r in reports if r[2] is None or files.exists(r[2])]
    manifest = publish(layout, still_staged, target_file_mb)

    assert manifest == first_plan["manifest"] == files.read_json(layout.marker(START))
    published = files.glob(partitions.join(layout.hour(layout.delivered, START), "*.avro"))
    assert published == sorted(f["path"] for f in manifest["files"])
    assert published_ids(layout, manifest) == staged_ids, "every staged record is published once"
    assert manifest["accounting"]["delivered"] == 1 + 2 + 3 and manifest["accounting"]["duplicates"] == 2
    assert not files.glob(partitions.join(layout.hour(layout.staging, START), "*")), "no plan, no file left behind"


def test_an_hours_panes_are_compacted_into_parts_of_the_target_size(tmp_path, registry):
    layout = Layout.under(tmp_path, "service_log", WINDOW)
    reports = stage(layout, registry, 5)
    sizes = [files.sizes(path)[path] for _, _, path in reports]
    staged_ids = sorted(r["event_id"] for _, _, path in reports for r in files.read_avro(path))

    manifest = publish(layout, reports, target_file_mb=1)  # far above five small panes
    [part] = manifest["files"]
    assert part["path"].endswith("/service_log-part00000.avro") and part["records"] == 1 + 2 + 3 + 4 + 5
    assert published_ids(layout, manifest) == staged_ids
    assert files.count_avro_records(part["path"]) == part["records"]
    with open(part["path"], "rb") as handle:
        assert fastavro.reader(handle).codec == files.AVRO_CODEC, "staged uncompressed, published compressed"
    assert sum(sizes) > 1024, "the parts are small here: grouping is checked below with byte targets"
    assert publish_hour.group_into_parts({"a-p1": (1, 600), "a-p2": (1, 600), "a-p3": (1, 300)}, 1000) == [
        ["a-p1"],
        ["a-p2", "a-p3"],
    ]
    assert publish_hour.group_into_parts({"r1-p1": (1, 1), "r2-p1": (1, 1)}, 1000) == [["r1-p1"], ["r2-p1"]], (
        "files of two runs (two schemas, maybe) never share a part"
    )
    assert publish_hour.group_into_parts({"a-p1": (1, 1), "a-p2": (1, 1)}, 0) == [["a-p1"], ["a-p2"]]
    pane = "staging/service_log-run1-p7-s003.avro"
    assert publish_hour.part_name("service_log", 4, [pane]) == "service_log-run1-p7-s003.avro", "a one-pane part"
    assert publish_hour.part_name("service_log", 4, [pane, pane + "x"]) == "service_log-part00004.avro"


def test_a_file_system_call_is_denied_for_good_only_when_every_cause_was():
    """Beam's ``FileSystems`` calls report a batch's failures per file, in one ``BeamIOError``."""
    forbidden, busy = google_errors.Forbidden("denied"), google_errors.ServiceUnavailable("busy")
    assert close.denied(BeamIOError("rename failed", {("a", "b"): forbidden, ("c", "d"): forbidden}))
    assert not close.denied(BeamIOError("rename failed", {("a", "b"): forbidden, ("c", "d"): busy}))
    assert not close.denied(BeamIOError("rename failed", {}))
    assert close.denied(forbidden) and not close.denied(busy)


@pytest.mark.parametrize("target_file_mb", [0, 1])
def test_a_plan_of_state_layout_5_leaves_out_the_superseded_copies_it_lists(tmp_path, registry, target_file_mb):
    """A job of state layout 5 listed in its plans' parts the copies a restart found superseded. A close of
    it that crashed after saving its plan is finished by this version, which leaves them out as planned."""
    layout = Layout.under(tmp_path, "service_log", WINDOW)
    reports = stage(layout, registry, 3)
    [_, second, third] = [path for _, _, path in reports]
    plan = publish_hour.plan_hour(layout, START, CLOSES_AT, reports, False, target_file_mb)
    superseded = {second: ["e1-0"], third: ["e2-2"]}
    for part in plan["parts"]:  # as layout 5 saved it
        part["left_out"] = [i for source in part["sources"] for i in superseded.get(source, [])]
        part["records"] -= len(part["left_out"])
    published = {part["path"]: part["records"] for part in plan["parts"]}
    counted = [*reports, report(DUPLICATES, 2)]
    plan["manifest"] = publish_hour.build_manifest("service_log", START, WINDOW, CLOSES_AT, published, counted)
    files.write_json(publish_hour.plan_path(layout, START), plan)
    for part in publish_hour.parts_to_write(plan):
        publish_hour.write_part(layout, START, part)
    manifest = publish_hour.finish_hour(layout, START)

    assert manifest == plan["manifest"] and published_ids(layout, manifest) == ["e0-0", "e1-1", "e2-0", "e2-1"]
    assert sum(f["records"] for f in manifest["files"]) == manifest["accounting"]["delivered"] == 4
    assert manifest["accounting"]["in"] == 1 + 2 + 3


def test_a_close_the_clock_finds_early_publishes_nothing_and_holds_no_drain(tmp_path, registry, monkeypatch):
    """On a drain every close timer fires while its hour is open by the clock. The close must
    publish nothing, and set no processing-time timer: Dataflow holds the watermark at such a
    timer's input timestamp, so the drain could not end before the hour did, and the hour
    would then be published with its messages still unread in the subscription."""

    class Timer:
        def set(self, timestamp):
            raise AssertionError(f"a timer set at {timestamp} would hold the drain")

    monkeypatch.setattr(close, "wall_clock", lambda: START + 1)
    settings = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path))
    fn = close.CloseHourFn(settings)
    fn.setup()
    window = IntervalWindow(START, START + WINDOW + LATENESS)
    closed = Flag()
    assert (
        list(fn._close(window, reports=None, closed=closed, close_again=Timer(), late_counts=None, waiting=None)) == []
    )
    assert closed.read() is None and not files.exists(settings.layout.marker(START))


class Flag:
    """An in-memory stand-in for Beam's read-modify-write state."""

    def __init__(self):
        self.value = None

    def read(self):
        return self.value

    def write(self, value):
        self.value = value


def test_repeats_dropped_after_the_close_are_each_counted_once_whichever_run_dropped_them(tmp_path, registry):
    """Each count of late repeats gets a file of its own, which two runs never share, and a
    retried count (its state not committed) rewrites its file instead of adding one."""
    layout = local_settings(tmp_path, registry["service_log"], local_keys(tmp_path)).layout
    window = IntervalWindow(START, START + WINDOW + LATENESS)
    for run_id, counts in (("run1", [3, 5]), ("run2", [7])):
        fn = close.CloseHourFn(local_settings(tmp_path, registry["service_log"], local_keys(tmp_path), run_id=run_id))
        fn.setup()
        late_counts = Flag()
        for records in counts:
            committed = late_counts.read()
            fn._after_the_close(report(DUPLICATES, records, None), window, late_counts, None)
            late_counts.write(committed)  # the bundle is retried: its state write is lost
            fn._after_the_close(report(DUPLICATES, records, None), window, late_counts, None)
    assert partitions.late_duplicates(layout, START) == 3 + 5 + 7


def test_only_what_a_saved_plan_was_not_made_from_is_unplanned_even_in_a_plan_of_an_earlier_version(tmp_path, registry):
    """A retried close (or a later run) meets reports the saved plan holds and ones that came after
    it: only those go late. A plan saved by a version before plans kept their counts is read too:
    everything without a file counts as after it."""
    layout = Layout.under(tmp_path, "service_log", WINDOW)
    [first, second] = stage(layout, registry, 2)
    plan = publish_hour.plan_hour(layout, START, CLOSES_AT, [first, second, report(DUPLICATES, 2)], False, 0)
    after = [stage(layout, registry, 3)[2], report(DUPLICATES, 2)]
    collected = [first, second, report(DUPLICATES, 2), *after]

    assert publish_hour.unplanned(plan, collected) == after
    earlier_version = {"manifest": plan["manifest"], "parts": plan["parts"]}
    assert publish_hour.unplanned(earlier_version, collected) == [
        collected[2],
        *after,
    ], "without counts, each of them comes after the plan"
    assert publish_hour.unplanned(None, collected) == collected, "published, its plan gone: everything is after"

"""The audit and the report shown hours made bad on purpose.

Each hour here is first published as the close publishes one (panes staged, a plan, the
parts, then the marker: ``transforms.publish``), with a dead letter, a late file and late
repeats where the jobs write them, and the auditor's count of what was published. Such an
hour passes every check. Each test then breaks one thing, as a faulty job or a hand in the
bucket could, and the audit must name exactly that fault, and the report paint it red.
"""

from __future__ import annotations

import datetime
import html.parser
import os
from unittest import mock

import pytest

from event_delivery.cloud import files
from event_delivery.contract import counts, partitions
from event_delivery.contract.dead_letters import ErrorKind, dead_letter, parsed_dead_letter_schema
from event_delivery.contract.partitions import Layout
from event_delivery.contract.registry import load_registry
from event_delivery.contract.slo import close_delay_budget_seconds
from tests.messages import valid_fields
from tools.ops import audit, audit_scan, report
from transforms import publish
from transforms.records import event_record
from transforms.reports import DEAD_LETTERED, DELIVERED, DUPLICATES
from transforms.reports import report as hour_report

TYPE = "service_log"  # a low-tier type: an hour is due 3 h 15 min after its end
WINDOW = partitions.HOUR_SECONDS
HOUR = 1_764_583_200  # 2025-12-01T10:00:00Z, long closed
PARTITION = partitions.partition(HOUR)
CLOSE_BUDGET = close_delay_budget_seconds(load_registry()[TYPE].tier)
LISTS = "_SUCCESS lists other files or counts than the folder"
COUNT = "_SUCCESS delivered count differs from the files"


def records(prefix: str, n: int, at_seconds: int) -> list[dict]:
    event_type = load_registry()[TYPE]
    return [event_record((f"{prefix}-{i}", at_seconds * 1000, valid_fields(event_type, i))) for i in range(n)]


def write_records(path: str, rows: list[dict], codec: str = files.AVRO_CODEC) -> None:
    files.write_avro(path, load_registry()[TYPE].parsed_delivered_schema, rows, codec)


def publish_hour(
    layout: Layout, hour_start: int = HOUR, panes=(3, 2), dead_letters=1, closed_after=60, counted=True
) -> dict:
    """An hour as a job leaves it, closed ``closed_after`` seconds after its end (None: still open):
    ``panes`` staged and published as a part each, 2 repeats dropped before the close, dead
    letters, one late event and one repeat after the close; and, if ``counted``, the auditor's
    count of exactly those messages. Returns what each outcome holds."""
    name, reports = layout.event_type, [hour_report(DUPLICATES, 2)]
    for number, n in enumerate(panes):
        path = partitions.join(
            layout.hour(layout.staging, hour_start), partitions.pane_file_name(name, "run1", number, 0)
        )
        write_records(path, records(f"e{hour_start}-{number}", n, hour_start + 1), files.UNCOMPRESSED)
        reports.append(hour_report(DELIVERED, n, path))
    if dead_letters:
        path = partitions.join(
            layout.hour(layout.dead_letter, hour_start), partitions.pane_file_name(name, "run1", 0, 0)
        )
        bad = dead_letter(name, ErrorKind.NOT_JSON, "not JSON", "bad", (hour_start + 2) * 1000, {}, b"sealed")
        files.write_avro(path, parsed_dead_letter_schema(), [bad] * dead_letters)
        reports.append(hour_report(DEAD_LETTERED, dead_letters, path))
    late = partitions.join(layout.hour(layout.late, hour_start), partitions.pane_file_name(name, "run1", 0, 0, "", "l"))
    write_records(late, records(f"late{hour_start}", 1, hour_start + 3))
    late_repeats = partitions.late_duplicates_name(name, "run1", 0)
    files.write_json(partitions.join(layout.hour(layout.late, hour_start), late_repeats), {DUPLICATES: 1})
    if closed_after is not None:
        closes_at = hour_start + WINDOW + closed_after
        plan = publish.plan_hour(layout, hour_start, closes_at, reports, False, target_file_mb=0)
        for part in publish.parts_to_write(plan):
            publish.write_part(layout, hour_start, part)
        publish.finish_hour(layout, hour_start)
        os.utime(layout.marker(hour_start), (closes_at, closes_at))
    outcomes = {"delivered": sum(panes), "duplicates": 2 + 1, "late": 1, "dead_lettered": dead_letters}
    if counted:
        published = sum(outcomes.values())
        document = counts.counts_document(name, hour_start, WINDOW, published, published - 3, "subscription", 0)
        files.write_json(layout.audit_counts(hour_start), document)
    return outcomes


def parts(layout: Layout, hour_start: int = HOUR) -> list[str]:
    return files.glob(partitions.join(layout.hour(layout.delivered, hour_start), "*.avro"))


def change_manifest(layout: Layout, change, hour_start: int = HOUR) -> None:
    """Rewrites the hour's ``_SUCCESS`` as ``change(manifest)`` leaves it, keeping its time."""
    marker = layout.marker(hour_start)
    written_at = files.updated_seconds(marker)
    manifest = files.read_json(marker)
    change(manifest)
    files.write_json(marker, manifest)
    os.utime(marker, (written_at, written_at))


def audited(layout: Layout) -> audit.TypeAudit:
    return audit.audit_type(layout, now=HOUR + 2 * WINDOW)


def run_main(root) -> int:
    with mock.patch("time.time", return_value=HOUR + 2 * WINDOW):
        return audit.main(["--storage_root", str(root), "--event_type", TYPE])


def test_an_hour_published_as_the_close_publishes_it_passes_every_check(tmp_path, capsys):
    layout = Layout.under(tmp_path, TYPE, WINDOW)
    outcomes = publish_hour(layout)
    result = audited(layout)
    hour = result.hours[PARTITION]
    assert (result.problems, result.failed_hours) == ([], {})
    assert {name: getattr(hour, name) for name in outcomes} == outcomes, "every outcome counted where it was written"
    assert (hour.published, hour.lost, hour.close_delay_seconds, hour.overdue) == (10, 0, 60, False)
    assert result.settled and result.reconciled and audit_scan.hours_settled(layout)
    assert run_main(tmp_path) == 0
    assert "problem" not in capsys.readouterr().out


# Each fault: how the hour is broken, what the audit must say of it, and the lost it then finds.


def lose_a_part(layout):
    files.delete_existing(parts(layout)[:1])


def add_an_unlisted_file(layout):
    write_records(partitions.join(layout.hour(layout.delivered, HOUR), "stray.avro"), records("stray", 1, HOUR + 5))


def swap_the_file_counts(layout, hour_start=HOUR):
    def swap(manifest):
        first, second = manifest["files"]
        first["records"], second["records"] = second["records"], first["records"]

    change_manifest(layout, swap, hour_start)


def overstate_the_delivered_count(layout):
    change_manifest(layout, lambda manifest: manifest["accounting"].update(delivered=6))


def lose_every_part(layout):
    files.delete_existing(parts(layout))


def deliver_the_hour_twice(layout):
    """Every part copied under a second name, and listed: the folder and its manifest agree."""
    copies = []
    for path in parts(layout):
        copy = path.replace(".avro", "-again.avro")
        files.concatenate_avro([path], copy)
        copies.append({"path": copy, "records": files.count_avro_records(copy)})

    def list_the_copies(manifest):
        manifest["files"] += copies
        manifest["accounting"]["delivered"] *= 2

    change_manifest(layout, list_the_copies)


def deliver_a_record_of_the_next_hour(layout):
    """A part, listed, whose record belongs to the next hour's folder."""
    path = partitions.join(layout.hour(layout.delivered, HOUR), "misplaced.avro")
    write_records(path, records("next", 1, HOUR + WINDOW + 1))

    def list_it(manifest):
        manifest["files"].append({"path": path, "records": 1})
        manifest["accounting"]["delivered"] += 1

    change_manifest(layout, list_it)


def write_a_late_record_of_the_hour_before(layout):
    path = partitions.join(layout.hour(layout.late, HOUR), "misplaced.avro")
    write_records(path, records("before", 1, HOUR - 1))


DELIVERED_IN, LATE_IN = f"delivered {PARTITION}", f"late {PARTITION}"
FAULTS = {
    "a file the manifest lists is missing": (lose_a_part, [LISTS, COUNT], 3),
    "a file is in the folder that the manifest does not list": (add_an_unlisted_file, [LISTS, COUNT], -1),
    "the manifest has the files' record counts wrong": (swap_the_file_counts, [LISTS], 0),
    "the manifest's delivered count is wrong": (overstate_the_delivered_count, [COUNT], 0),
    "a marker without its parts": (lose_every_part, [LISTS, COUNT], 5),
    "the hour delivered twice": (deliver_the_hour_twice, ["duplicate event ids"], -5),
    "a delivered record of another hour": (deliver_a_record_of_the_next_hour, ["outside"], -1),
    "a late record of another hour": (write_a_late_record_of_the_hour_before, ["late outside"], -1),
}


def expected_problem(fault: str) -> str:
    if fault == "outside":
        return f"{DELIVERED_IN}: a record's received_at is outside the partition"
    if fault == "late outside":
        return f"{LATE_IN}: a record's received_at is outside the partition"
    return f"{DELIVERED_IN}: {fault}"


@pytest.mark.parametrize("fault", FAULTS)
def test_the_audit_names_each_fault_of_a_closed_hour_and_fails(tmp_path, capsys, fault):
    break_the_hour, problems, lost = FAULTS[fault]
    layout = Layout.under(tmp_path, TYPE, WINDOW)
    publish_hour(layout)
    break_the_hour(layout)

    result = audited(layout)
    assert result.problems == [expected_problem(p) for p in problems]
    assert result.hours[PARTITION].lost == lost
    assert result.failed_hours == ({PARTITION: [f"lost {lost}"]} if lost else {})
    assert run_main(tmp_path) == 1
    printed = capsys.readouterr().out
    assert all(f"problem in {TYPE}: {expected_problem(p)}" in printed for p in problems)


def test_an_hour_with_a_file_still_staged_after_its_marker_is_not_settled(tmp_path):
    layout = Layout.under(tmp_path, TYPE, WINDOW)
    publish_hour(layout)
    straggler = partitions.join(layout.hour(layout.staging, HOUR), partitions.pane_file_name(TYPE, "run2", 0, 0))
    write_records(straggler, records("straggler", 2, HOUR + 4), files.UNCOMPRESSED)
    result = audited(layout)
    assert result.hours[PARTITION].staged == 2
    assert not result.settled and not audit_scan.hours_settled(layout)


def test_an_hour_with_parts_and_no_marker_is_not_settled_and_its_loss_not_yet_known(tmp_path):
    layout = Layout.under(tmp_path, TYPE, WINDOW)
    publish_hour(layout)
    files.delete_existing([layout.marker(HOUR)])
    result = audited(layout)
    hour = result.hours[PARTITION]
    assert (hour.closed, hour.delivered, hour.lost) == (False, 5, None)
    assert not result.settled and not audit_scan.hours_settled(layout)


def test_a_closed_hour_with_output_but_no_count_is_not_reconciled(tmp_path):
    layout = Layout.under(tmp_path, TYPE, WINDOW)
    publish_hour(layout, counted=False)
    assert not audited(layout).reconciled, "an hour with output must have the auditor's count"

    empty = Layout.under(tmp_path / "empty", TYPE, WINDOW)
    files.write_json(empty.marker(HOUR), publish.build_manifest(TYPE, HOUR, WINDOW, HOUR + WINDOW, {}, []))
    result = audited(empty)
    assert result.hours[PARTITION].closed and result.reconciled, "an empty closed hour had nothing to lose"


# The report: each service level that an hour breaks is red, and the audit's problems are listed.


class Cells(html.parser.HTMLParser):
    """The report's table cells by (type, hour or None, metric): (text, slo), and its problems."""

    def __init__(self, page: str):
        super().__init__()
        self.cells, self.problems, self._cell, self._in_problems = {}, [], None, False
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "td" and "data-metric" in attrs:
            key = (attrs["data-type"], attrs.get("data-hour"), attrs["data-metric"])
            self._cell = [key, "", attrs.get("data-slo")]
        elif tag == "ul" and attrs.get("class") == "problems":
            self._in_problems = True
        elif tag == "li" and self._in_problems:
            self.problems.append("")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell:
            key, text, slo = self._cell
            self.cells[key] = (text, slo)
            self._cell = None
        elif tag == "ul":
            self._in_problems = False

    def handle_data(self, data):
        if self._cell:
            self._cell[1] += data
        elif self._in_problems and self.problems:
            self.problems[-1] += data


def rendered(root, now: float) -> Cells:
    page = report.render(
        [report.collect(str(root), TYPE, WINDOW, now=now)],
        str(root),
        datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc),
    )
    return Cells(page)


def test_the_report_is_green_for_hours_that_keep_every_service_level(tmp_path):
    layout = Layout.under(tmp_path, TYPE, WINDOW)
    for i in range(3):
        publish_hour(layout, HOUR + i * WINDOW, panes=(60, 50), dead_letters=1)  # under 1 % dead-lettered
    page = rendered(tmp_path, now=HOUR + 4 * WINDOW)
    for metric in ("on_time", "lost", "dead_letter_rate"):
        assert page.cells[TYPE, None, metric][1] == "ok", metric
    assert page.cells[TYPE, None, "lost"][0] == "0" and page.problems == []


def test_the_report_paints_red_each_hour_that_breaks_a_service_level_and_lists_the_audits_problems(tmp_path):
    layout = Layout.under(tmp_path, TYPE, WINDOW)
    clean, lossy, closed_late, dead_lettering, uncounted, misfiled, still_open = (HOUR + i * WINDOW for i in range(7))
    for hour_start in (clean, lossy, misfiled):
        publish_hour(layout, hour_start, panes=(60, 50))
    publish_hour(layout, closed_late, panes=(60, 50), closed_after=CLOSE_BUDGET + 1)
    publish_hour(layout, dead_lettering, panes=(3, 2), dead_letters=1)  # 1 of 9 published
    publish_hour(layout, uncounted, panes=(60, 50), counted=False)
    publish_hour(layout, still_open, panes=(60, 50), closed_after=None)
    document = files.read_json(layout.audit_counts(lossy))
    files.write_json(layout.audit_counts(lossy), {**document, "published": document["published"] + 1})
    swap_the_file_counts(layout, misfiled)
    now = still_open + WINDOW + CLOSE_BUDGET + 1  # the open hour is past its due time

    page = rendered(tmp_path, now)
    slo = {(hour, metric): page.cells[TYPE, partitions.partition(hour), metric][1] for hour, metric in _every(page)}
    red = {(hour, metric) for (hour, metric), state in slo.items() if state == "bad"}
    assert red == {
        (lossy, "lost"),
        (closed_late, "close_delay"),
        (dead_lettering, "dead_letter_rate"),
        (still_open, "close_delay"),
    }
    assert slo[uncounted, "lost"] == "unknown", "no count: loss not known"
    assert page.cells[TYPE, partitions.partition(lossy), "lost"][0] == "1"
    assert page.cells[TYPE, partitions.partition(still_open), "state"][0] == "open, 110 staged"
    for metric in ("on_time", "lost", "dead_letter_rate"):
        assert page.cells[TYPE, None, metric][1] == "bad", metric
    assert page.problems == [f"delivered {partitions.partition(misfiled)}: {LISTS}"]


def _every(page: Cells):
    """(hour start, metric) of every hour cell that has a service level."""
    for (_, hour, metric), (_, slo) in page.cells.items():
        if hour is not None and slo is not None:
            yield partitions.partition_bounds(hour, WINDOW)[0] // 1000, metric

"""The audit reads a storage root that jobs may be writing at the same moment."""

from __future__ import annotations

import datetime
import json
import os
from unittest import mock

import fastavro
import pytest

from event_delivery.cloud import files
from event_delivery.contract import counts, partitions, slo
from event_delivery.contract.registry import load_registry
from tools.ops import audit, audit_scan

HOUR = 1_795_946_400  # 2026-11-29T10:00:00Z
SCHEMA = fastavro.parse_schema(
    {
        "type": "record",
        "name": "Event",
        "fields": [
            {"name": "event_id", "type": "string"},
            {"name": "received_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        ],
    }
)


def test_a_file_that_a_close_moves_while_the_audit_reads_is_counted_where_it_went(tmp_path, monkeypatch):
    layout = partitions.Layout.under(str(tmp_path), "play", 3600)
    name = partitions.pane_file_name("play", "run1", 0, 0)
    staged = partitions.join(layout.hour(layout.staging, HOUR), name)
    published = partitions.join(layout.hour(layout.delivered, HOUR), name)
    received_at = datetime.datetime.fromtimestamp(HOUR + 5, tz=datetime.timezone.utc)
    files.write_avro(staged, SCHEMA, [{"event_id": f"e{i}", "received_at": received_at} for i in range(3)])

    count = files.count_avro_records
    moves = []

    def close_meanwhile(path):  # the hour closes between the audit's listing and its read
        if not moves:
            moves.append(path)
            files.concatenate_avro([staged], published)  # as the close publishes a part of one pane
            files.delete_existing([staged])
        return count(path)

    monkeypatch.setattr(files, "count_avro_records", close_meanwhile)
    result = audit.audit_type(layout)
    assert moves == [staged]
    assert (result.total("staged"), result.total("delivered")) == (0, 3)
    assert sorted(result.hours[partitions.partition(HOUR)].delivered_ids) == ["e0", "e1", "e2"]


# The audit against the auditor's counts: lost, and hours overdue.

WINDOW = 3600


def deliver_hour(layout, hour_start, ids, duplicates=0, closed_after_seconds=None, replayed=False):
    """An hour as delivery leaves it: its records and, closed ``closed_after_seconds`` after
    the hour's end, its marker (by a backfill, if ``replayed``)."""
    received_at = datetime.datetime.fromtimestamp(hour_start + 5, tz=datetime.timezone.utc)
    folder = layout.hour(layout.delivered if closed_after_seconds is not None else layout.staging, hour_start)
    path = partitions.join(folder, partitions.pane_file_name(layout.event_type, "run1", 0, 0))
    files.write_avro(path, SCHEMA, [{"event_id": i, "received_at": received_at} for i in ids])
    if closed_after_seconds is not None:
        accounting = {"delivered": len(ids), "duplicates": duplicates, "dead_lettered": 0}
        files.write_json(
            layout.marker(hour_start),
            {"files": [{"path": path, "records": len(ids)}], "accounting": accounting, "replayed": replayed},
        )
        closed_at = hour_start + WINDOW + closed_after_seconds
        os.utime(layout.marker(hour_start), (closed_at, closed_at))


def count_published(layout, hour_start, published, distinct_ids):
    document = counts.counts_document(layout.event_type, hour_start, WINDOW, published, distinct_ids, "subscription", 0)
    files.write_json(layout.audit_counts(hour_start), document)


def test_an_hour_with_fewer_outcomes_than_published_messages_is_named_as_lost(tmp_path, capsys):
    layout = partitions.Layout.under(str(tmp_path), "play", WINDOW)
    deliver_hour(layout, HOUR, ["e0", "e1", "e2"], duplicates=1, closed_after_seconds=60)
    count_published(layout, HOUR, published=5, distinct_ids=4)  # one message is nowhere
    deliver_hour(layout, HOUR + WINDOW, ["e3"], closed_after_seconds=60)
    count_published(layout, HOUR + WINDOW, published=1, distinct_ids=1)
    now = HOUR + 3 * WINDOW

    result = audit.audit_type(layout, now=now)
    lossy, clean = result.hours[partitions.partition(HOUR)], result.hours[partitions.partition(HOUR + WINDOW)]
    assert (lossy.published, lossy.distinct_ids, lossy.total, lossy.lost) == (5, 4, 4, 1)
    assert (clean.lost, clean.close_delay_seconds, clean.overdue) == (0, 60, False)
    assert result.failed_hours == {partitions.partition(HOUR): ["lost 1"]}

    with mock.patch("time.time", return_value=now):
        assert audit.main(["--storage_root", str(tmp_path), "--event_type", "play"]) == 1
    printed = capsys.readouterr().out
    assert f"play {partitions.partition(HOUR)}: lost 1" in printed
    [row] = [line.split() for line in printed.splitlines() if line.split()[:2] == ["play", partitions.partition(HOUR)]]
    assert row[2:] == ["5", "4", "3", "1", "0", "0", "1", "60.0s", "LOST", "1"]


def test_an_hour_is_overdue_without_its_marker_past_the_deadline_or_with_a_late_one(tmp_path):
    layout = partitions.Layout.under(str(tmp_path), "play", WINDOW)
    deadline = WINDOW + slo.close_delay_budget_seconds(load_registry()["play"].tier)
    deliver_hour(layout, HOUR, ["e0"], closed_after_seconds=deadline - WINDOW + 1)  # closed a second too late
    deliver_hour(layout, HOUR + WINDOW, ["e1"])  # still staged
    count_published(layout, HOUR + 2 * WINDOW, published=2, distinct_ids=2)  # counted, never delivered
    late, staged, undelivered = (partitions.partition(HOUR + i * WINDOW) for i in range(3))

    early = audit.audit_type(layout, now=HOUR + WINDOW + deadline)  # the staged hour's deadline, to the second
    assert [early.hours[p].overdue for p in (late, staged, undelivered)] == [True, False, False]
    assert early.hours[undelivered].lost is None, "not known before the hour closes"
    later = audit.audit_type(layout, now=HOUR + 2 * WINDOW + deadline + 1)
    assert later.failed_hours == {late: ["overdue"], staged: ["overdue"], undelivered: ["overdue"]}


def test_an_hour_a_backfill_closed_long_after_is_not_judged_overdue(tmp_path):
    layout = partitions.Layout.under(str(tmp_path), "play", WINDOW)
    days = 3 * 24 * 3600
    deliver_hour(layout, HOUR, ["e0"], closed_after_seconds=days, replayed=True)
    deliver_hour(layout, HOUR + WINDOW, ["e1"], closed_after_seconds=days)  # the same, by a stream: overdue
    result = audit.audit_type(layout, now=HOUR + days + 2 * WINDOW)
    assert result.failed_hours == {partitions.partition(HOUR + WINDOW): ["overdue"]}
    assert result.hours[partitions.partition(HOUR)].close_delay_seconds is None


def test_hours_without_the_auditors_count_pass_as_before(tmp_path, capsys):
    layout = partitions.Layout.under(str(tmp_path), "play", WINDOW)
    deliver_hour(layout, HOUR, ["e0", "e1"], closed_after_seconds=1)
    result = audit.audit_type(layout, now=HOUR + 10 * WINDOW)
    assert result.hours[partitions.partition(HOUR)].lost is None and not result.failed_hours
    with mock.patch("time.time", return_value=HOUR + 10 * WINDOW):
        assert audit.main(["--storage_root", str(tmp_path), "--event_type", "play", "--json"]) == 0
    hour = json.loads(capsys.readouterr().out)["play"]["hours"][partitions.partition(HOUR)]
    assert (hour["published"], hour["lost"], hour["delivered"], hour["closed"]) == (None, None, 2, True)


def test_the_table_names_each_hours_state_and_aligns_the_numbers(tmp_path):
    """The status column is what an operator reads first: open, ok, empty (closed with nothing
    to count), no count (output but no auditor's count), or what failed, in capitals."""
    hours = {
        "dt=a": audit.HourAudit("dt=a"),
        "dt=b": audit.HourAudit("dt=b", delivered=12, closed=True, published=12, close_delay_seconds=61.25),
        "dt=c": audit.HourAudit("dt=c", closed=True),
        "dt=d": audit.HourAudit("dt=d", delivered=1, closed=True),
        "dt=e": audit.HourAudit("dt=e", delivered=1, closed=True, published=3, overdue=True),
    }
    table = audit.format_table([audit.TypeAudit("play", hours)])
    assert table.splitlines() == [
        "type  hour  published  distinct ids  delivered  duplicates  late  dead-lettered  lost  close delay  status",
        "-" * 115,  # as wide as the widest row
        "play  dt=a          -             -          0           0     0              0     -            -  open",
        "play  dt=b         12             -         12           0     0              0     0        61.2s  ok",
        "play  dt=c          -             -          0           0     0              0     -            -  empty",
        "play  dt=d          -             -          1           0     0              0     -            -  no count",
        "play  dt=e          3             -          1           0     0              0     2            -  LOST 2, OVERDUE",  # noqa: E501
    ]


def test_the_command_audits_the_types_asked_for_against_the_deadline_of_the_lateness_given(tmp_path, capsys):
    """With ``--allowed_lateness_seconds`` an hour is overdue once its marker comes later than
    the window, that lateness and the tier's close margin after the hour's start, to the second."""
    layout = partitions.Layout.under(str(tmp_path), "play", WINDOW)
    lateness, margin = 120, load_registry()["play"].tier.close_margin_seconds
    deliver_hour(layout, HOUR, ["e0"], closed_after_seconds=lateness + margin)  # on the deadline
    deliver_hour(layout, HOUR + WINDOW, ["e1"], closed_after_seconds=lateness + margin + 1)  # a second past it
    flags = ["--storage_root", f"{tmp_path}/", "--window_seconds", str(WINDOW), "--json"]

    with mock.patch("time.time", return_value=HOUR + 10 * WINDOW):
        assert audit.main([*flags, "--event_type", "play", "--allowed_lateness_seconds", str(lateness)]) == 1
        asked = json.loads(capsys.readouterr().out)
        assert audit.main(flags) == 0, "the tier's own lateness is longer: nothing is overdue"
        every = json.loads(capsys.readouterr().out)
    assert list(asked) == ["play"] and sorted(every) == sorted(load_registry())
    assert asked["play"]["failed_hours"] == {partitions.partition(HOUR + WINDOW): ["overdue"]}
    assert set(asked["play"]) == {
        "delivered", "duplicates", "late", "dead_lettered", "closed_hours", "staged_in_open_hours",
        "problems", "failed_hours", "hours",
    }  # fmt: skip
    assert (asked["play"]["delivered"], asked["play"]["closed_hours"]) == (2, 2)
    hour = asked["play"]["hours"][partitions.partition(HOUR)]
    assert set(hour) == {
        "published", "distinct_ids", "delivered", "duplicates", "late", "dead_lettered", "staged", "lost",
        "closed", "close_delay_seconds", "overdue",
    }  # fmt: skip
    assert (hour["close_delay_seconds"], hour["overdue"]) == (lateness + margin, False)


def test_the_command_refuses_a_missing_root_or_an_unknown_type_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "missing"
    with pytest.raises(SystemExit) as exit:
        audit.main(["--storage_root", str(missing)])
    assert exit.value.code == 2 and not missing.exists()
    assert capsys.readouterr().err.startswith("python -m tools.ops.audit: error: there is no folder")
    for argv in ([], ["--storage_root", str(tmp_path), "--event_type", "no_such_type"]):
        with pytest.raises(SystemExit) as exit:
            audit.main(argv)
        assert exit.value.code == 2
        assert capsys.readouterr().err.startswith("usage: python -m tools.ops.audit")


def test_a_record_on_its_hours_first_millisecond_belongs_to_it_and_one_on_the_next_hours_does_not(tmp_path):
    layout = partitions.Layout.under(str(tmp_path), "play", WINDOW)
    problems = []
    for received_at in (HOUR, HOUR + WINDOW):
        hour = audit.TypeAudit("play")
        at = datetime.datetime.fromtimestamp(received_at, tz=datetime.timezone.utc)
        records = [{"received_at": at}]
        audit_scan._check_in_hour(hour, partitions.partition(HOUR), records, layout.window_seconds, "late")
        problems.append(hour.problems)
    assert problems == [[], [f"late {partitions.partition(HOUR)}: a record's received_at is outside the partition"]]

"""Closing an hour: a close that fails halfway and runs again publishes the same hour."""

from __future__ import annotations

import pytest
from apache_beam.io.filesystem import BeamIOError
from google.api_core import exceptions as google_errors

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.partitions import Layout
from tests.conftest import valid_fields
from tests.streams import START, WINDOW
from transforms import close
from transforms.reports import DELIVERED, DUPLICATES, report
from transforms.write import event_record

CLOSES_AT = START + WINDOW + 30


def stage(layout: Layout, registry, count: int) -> list[tuple]:
    """``count`` staged pane files of the hour, as the writer reports them."""
    log = registry["service_log"]
    folder = layout.hour(layout.staging, START)
    reports = []
    for number in range(count):
        events = [(f"e{number}-{i}", (START + 1) * 1000, valid_fields(log, i)) for i in range(number + 1)]
        path = partitions.join(folder, partitions.pane_file_name("service_log", "run1", number, 0))
        files.write_avro(path, log.parsed_delivered_schema, [event_record(e) for e in events])
        reports.append(report(DELIVERED, len(events), path))
    return reports


def test_a_close_retried_after_a_partial_move_publishes_the_same_files_and_manifest(tmp_path, registry, monkeypatch):
    layout = Layout.under(tmp_path, "service_log", WINDOW)
    reports = stage(layout, registry, 3) + [report(DUPLICATES, 2, None)]
    expected = close.build_manifest(
        "service_log",
        START,
        WINDOW,
        CLOSES_AT,
        {partitions.join(layout.hour(layout.delivered, START), p.rsplit("/", 1)[1]): n for _, n, p in reports[:3]},
        reports,
    )

    move_all = files.move_all

    def crash_after_the_first_move(sources, destinations):
        move_all(sources[:1], destinations[:1])
        raise OSError("the worker died")

    monkeypatch.setattr(files, "move_all", crash_after_the_first_move)
    with pytest.raises(OSError):
        close.publish_hour(layout, START, CLOSES_AT, reports)
    monkeypatch.setattr(files, "move_all", move_all)
    assert not files.exists(layout.marker(START))

    # The retry's listing no longer finds the moved file, as a fresh close would not either.
    still_staged = [r for r in reports if r[2] is None or files.exists(r[2])]
    assert len(still_staged) == len(reports) - 1
    manifest = close.publish_hour(layout, START, CLOSES_AT, still_staged)

    assert manifest == expected == files.read_json(layout.marker(START))
    published = files.glob(partitions.join(layout.hour(layout.delivered, START), "*.avro"))
    assert published == sorted(f["path"] for f in manifest["files"])
    assert manifest["accounting"]["delivered"] == 1 + 2 + 3
    assert not files.glob(partitions.join(layout.hour(layout.staging, START), "*")), "no plan, no file left behind"


def test_a_batched_move_is_denied_for_good_only_when_every_file_of_it_was():
    """Beam's ``FileSystems.rename`` reports a batch's failures per file, in one ``BeamIOError``."""
    forbidden, busy = google_errors.Forbidden("denied"), google_errors.ServiceUnavailable("busy")
    assert close.denied(BeamIOError("rename failed", {("a", "b"): forbidden, ("c", "d"): forbidden}))
    assert not close.denied(BeamIOError("rename failed", {("a", "b"): forbidden, ("c", "d"): busy}))
    assert not close.denied(BeamIOError("rename failed", {}))
    assert close.denied(forbidden) and not close.denied(busy)

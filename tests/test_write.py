"""Pane files: deterministic names in the hour layout, replaced (never duplicated) on retry."""

from __future__ import annotations

import io

import fastavro
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import IntervalWindow
from apache_beam.utils.windowed_value import PaneInfo, PaneInfoTiming

from event_delivery.cloud import files
from tests.conftest import valid_fields
from tests.streams import local_keys, local_settings
from transforms.reports import DELIVERED
from transforms.write import WritePaneFn

HOUR = 1_800_000_000 - 1_800_000_000 % 3600  # 2027-01-15T08:00:00Z


def write_pane(root, event_type, events, pane_index=0, shard=3):
    settings = local_settings(root, event_type, local_keys(root), window_seconds=3600)
    record = lambda e: {"event_id": e[0], "received_at": e[1], **e[2]}  # noqa: E731
    fn = WritePaneFn(settings, root, DELIVERED, event_type.clear_schema, record)
    fn.setup()
    window = IntervalWindow(HOUR, HOUR + 3600 + 600)
    pane = PaneInfo(pane_index == 0, False, PaneInfoTiming.EARLY, pane_index, -1)
    return list(fn.process((shard, events), window=window, pane=pane))


def events(event_type, ids):
    return [(event_id, HOUR * 1000 + i, valid_fields(event_type, i)) for i, event_id in enumerate(ids)]


def read(path):
    with FileSystems.open(path) as handle:
        return fastavro.reader(io.BytesIO(handle.read()))


def test_a_pane_becomes_one_file_named_by_hour_pane_and_shard(tmp_path, registry):
    play = registry["play"]
    [(kind, records, path)] = write_pane(str(tmp_path), play, events(play, ["a", "b"]), pane_index=7, shard=3)
    assert (kind, records) == (DELIVERED, 2)
    assert path == f"{tmp_path}/play/dt=2027-01-15/hr=08/play-run1-p00007-s003.avro"
    reader = read(path)
    assert [r["event_id"] for r in reader] == ["a", "b"]
    assert reader.metadata["avro.codec"] == "deflate"
    assert reader.writer_schema["name"].endswith("PlayClear")


def test_a_retried_pane_replaces_its_file(tmp_path, registry):
    play = registry["play"]
    first = write_pane(str(tmp_path), play, events(play, ["a", "b"]))
    again = write_pane(str(tmp_path), play, events(play, ["a", "b"]))
    assert first == again
    assert len(files.glob(f"{tmp_path}/play/*/*/*.avro")) == 1
    assert len(list(read(first[0][2]))) == 2


def test_an_empty_pane_writes_nothing(tmp_path, registry):
    assert write_pane(str(tmp_path), registry["play"], []) == []
    assert not files.glob(f"{tmp_path}/**")


@pytest.mark.emulators
def test_panes_land_on_the_gcs_emulator(bucket, registry):
    search = registry["search"]
    [(_, _, path)] = write_pane(f"gs://{bucket}/delivered", search, events(search, ["x"]))
    assert path.startswith(f"gs://{bucket}/delivered/search/dt=2027-01-15/hr=08/")
    assert [r["event_id"] for r in read(path)] == ["x"]
    assert files.count_avro_records(path) == 1

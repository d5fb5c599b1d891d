"""Pane files: deterministic names in the hour layout, replaced (never duplicated) on retry."""

from __future__ import annotations

import io

import apache_beam as beam
import fastavro
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import IntervalWindow
from apache_beam.utils.windowed_value import PaneInfo, PaneInfoTiming, WindowedValue

from event_delivery.cloud import files
from event_delivery.keys.config import KeyConfig
from tests.messages import forgotten_event, valid_fields
from tests.streams import LATENESS, START, TRIGGER, WINDOW, Clock, local_keys, local_settings, streaming_pipeline
from transforms.close import CloseHour
from transforms.hours import BucketByHour
from transforms.reports import DELIVERED
from transforms.write import WriteAvroPanes, WriteBoundedPaneFn

HOUR = 1_800_000_000 - 1_800_000_000 % 3600  # 2027-01-15T08:00:00Z


def write_pane(root, event_type, events, number=0, shard=3, writer=""):
    unused = KeyConfig("sqlite:///never-opened.db", "never-opened.key")  # writing seals nothing
    settings = local_settings(root, event_type, unused, window_seconds=3600)
    record = lambda e: {"event_id": e[0], "received_at": e[1], **e[2]}  # noqa: E731
    fn = WriteBoundedPaneFn(settings, root, DELIVERED, event_type.clear_schema, record)
    fn.setup()
    window = IntervalWindow(HOUR, HOUR + 3600 + 600)
    return list(fn.write(((shard, writer), events), window, number))


def events(event_type, ids):
    return [(event_id, HOUR * 1000 + i, valid_fields(event_type, i)) for i, event_id in enumerate(ids)]


def read(path):
    with FileSystems.open(path) as handle:
        return fastavro.reader(io.BytesIO(handle.read()))


def test_a_pane_becomes_one_file_named_by_hour_number_and_shard(tmp_path, registry):
    play = registry["play"]
    [(kind, records, path)] = write_pane(str(tmp_path), play, events(play, ["a", "b"]), number=7, shard=3)
    assert (kind, records) == (DELIVERED, 2)
    assert path == f"{tmp_path}/play/dt=2027-01-15/hr=08/play-run1-p00007-s003.avro"
    reader = read(path)
    assert [r["event_id"] for r in reader] == ["a", "b"]
    assert reader.metadata["avro.codec"] == "deflate"
    assert reader.writer_schema["name"].endswith("PlayClear")


def test_panes_of_one_shard_from_two_writers_never_share_a_file(tmp_path, registry):
    """A stream splits a shard's panes by worker process; each numbers its own from 0."""
    play = registry["play"]
    [(_, _, first)] = write_pane(str(tmp_path), play, events(play, ["a"]), shard=3, writer="w1")
    [(_, _, second)] = write_pane(str(tmp_path), play, events(play, ["b"]), shard=3, writer="w2")
    assert first.endswith("/play-run1-p00000-s003-ww1.avro")
    assert first != second
    assert [r["event_id"] for path in (first, second) for r in read(path)] == ["a", "b"]


def test_a_retried_pane_replaces_its_file(tmp_path, registry):
    play = registry["play"]
    first = write_pane(str(tmp_path), play, events(play, ["a", "b"]))
    again = write_pane(str(tmp_path), play, events(play, ["a", "b"]))
    assert first == again
    assert len(files.glob(f"{tmp_path}/play/*/*/*.avro")) == 1
    assert len(list(read(first[0][2]))) == 2


def test_an_empty_pane_writes_nothing(tmp_path, registry):
    assert write_pane(str(tmp_path), registry["play"], []) == []
    assert not files.glob(f"{tmp_path}/**/*.avro")


@pytest.mark.emulators
def test_panes_land_on_the_gcs_emulator(bucket, registry):
    search = registry["search"]
    [(_, _, path)] = write_pane(f"gs://{bucket}/delivered", search, events(search, ["x"]))
    assert path.startswith(f"gs://{bucket}/delivered/search/dt=2027-01-15/hr=08/")
    assert [r["event_id"] for r in read(path)] == ["x"]
    assert files.count_avro_records(path) == 1


class ResetPaneInfoFn(beam.DoFn):
    """What Dataflow's Runner v2 does to panes after a reshuffle: each looks like the first."""

    def process(self, element, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam):
        yield WindowedValue(element, timestamp, [window], PaneInfo(True, True, PaneInfoTiming.UNKNOWN, 0, 0))


def test_file_names_survive_a_runner_that_resets_pane_indices(tmp_path, registry):
    """Three panes of one (hour, shard) reach the writer as pane 0 each: three files, every record counted."""
    log = registry["service_log"]
    settings = local_settings(tmp_path, log, local_keys(tmp_path), num_shards=1, target_file_mb=0)  # a part per pane
    clock, sent = Clock(START), []
    for batch in range(3):
        ids = [f"b{batch}-{i}" for i in range(4)]
        clock.arrive(*(forgotten_event(log, i, (START + 1) * 1000, n) for n, i in enumerate(ids)))
        clock.advance(TRIGGER * 2)
        sent += ids
    clock.advance(WINDOW + LATENESS)
    with streaming_pipeline() as pipeline:
        panes = pipeline | clock.finish() | BucketByHour(settings) | "ResetPaneInfo" >> beam.ParDo(ResetPaneInfoFn())
        staged = panes | WriteAvroPanes(settings, settings.layout.staging, DELIVERED)
        staged | CloseHour(settings)

    [marker] = files.glob(f"{settings.layout.delivered}/service_log/*/*/_SUCCESS")
    manifest = files.read_json(marker)
    assert len(manifest["files"]) == 3, "one file per pane, none written over another"
    assert manifest["accounting"]["delivered"] == len(sent)
    delivered = [r["event_id"] for entry in manifest["files"] for r in files.read_avro(entry["path"])]
    assert sorted(delivered) == sorted(sent)

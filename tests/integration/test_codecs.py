"""``--codec``: delivered, late and dead-letter files in the chosen codec, read back by fastavro and by
the Apache Avro reader; one codec per part, whatever its sources had and whatever an update changed."""

from __future__ import annotations

import dataclasses
import io

import avro.datafile
import avro.io
import fastavro
import pytest

from event_delivery.cloud import files
from event_delivery.contract import partitions
from event_delivery.contract.partitions import Layout
from pipelines import redrive
from pipelines.delivery import deliver
from tests.messages import message, raw_message, valid_fields
from tests.streams import LATENESS, START, TRIGGER, WINDOW, Clock, local_keys, local_settings, streaming_pipeline
from transforms import late, publish
from transforms.records import event_record
from transforms.reports import DELIVERED, report

CLOSES_AT = START + WINDOW + LATENESS
ROOTS = ("delivered", "late", "dead_letter")


def read_by_both(path: str) -> tuple[str, list[dict]]:
    """The file's codec and records, after checking that fastavro and the Apache Avro reader agree on both."""
    with open(path, "rb") as handle:
        data = handle.read()
    by_fastavro = fastavro.reader(io.BytesIO(data))
    fast_records = list(by_fastavro)
    by_apache = avro.datafile.DataFileReader(io.BytesIO(data), avro.io.DatumReader())
    apache_records = list(by_apache)
    assert by_apache.get_meta("avro.codec").decode() == by_fastavro.codec
    assert [r["event_id"] for r in apache_records] == [r["event_id"] for r in fast_records]
    return by_fastavro.codec, fast_records


@pytest.mark.parametrize("codec", files.CODECS)
def test_each_codecs_delivered_late_and_dead_letter_files_read_back_by_both_readers(tmp_path, registry, codec):
    log = registry["service_log"]
    settings = local_settings(tmp_path, log, local_keys(tmp_path), num_shards=2, codec=codec)
    clock = Clock(START)
    clock.arrive(*(message(valid_fields(log, i), f"e{i}", (START + i) * 1000) for i in range(6)))
    clock.arrive(raw_message(b"not json", "bad-1"))
    clock.advance(WINDOW + LATENESS + TRIGGER)  # closes the first hour
    clock.arrive(message(valid_fields(log, 9), "late-1", (START + 9) * 1000))
    clock.advance(WINDOW + LATENESS + TRIGGER)
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), settings)

    found = {}
    for name in ROOTS:
        paths = files.glob(f"{getattr(settings.layout, name)}/service_log/**/*.avro")
        found[name] = [(path, *read_by_both(path)) for path in paths]
    assert {name: bool(found[name]) for name in ROOTS} == dict.fromkeys(ROOTS, True), "a file of each kind"
    assert {c for name in ROOTS for _, c, _ in found[name]} == {codec}
    ids = {name: sorted(r["event_id"] for _, _, records in found[name] for r in records) for name in ROOTS}
    assert ids == {"delivered": [f"e{i}" for i in range(6)], "late": ["late-1"], "dead_letter": ["bad-1"]}


def stage_in(layout: Layout, registry, codecs: list[str]) -> list[tuple]:
    """A staged pane file of the hour in each of ``codecs``, as the writer reports them."""
    log, folder, reports = registry["service_log"], layout.hour(layout.staging, START), []
    for number, codec in enumerate(codecs):
        records = [event_record((f"e{number}-{i}", (START + 1) * 1000, valid_fields(log, i))) for i in range(300)]
        path = partitions.join(folder, partitions.pane_file_name("service_log", "run1", number, 0))
        files.write_avro(path, log.parsed_delivered_schema, records, codec)
        reports.append(report(DELIVERED, len(records), path))
    return reports


@pytest.mark.parametrize("codec", files.CODECS)
def test_a_part_copied_block_by_block_has_one_codec_whatever_its_sources_had(tmp_path, registry, codec):
    """A block is decompressed as it is read and compressed again as it is written: were one copied as
    it was stored, the part would hold blocks of another codec than it names, which no reader reads."""
    layout = Layout.under(tmp_path, "service_log", WINDOW)
    reports = stage_in(layout, registry, [files.UNCOMPRESSED, *files.CODECS])
    sources = [path for _, _, path in reports]
    destination = str(tmp_path / "part.avro")

    assert files.concatenate_avro(sources, destination, codec) == 300 * len(sources)
    written_codec, records = read_by_both(destination)
    assert written_codec == codec
    assert [r["event_id"] for r in records] == [r["event_id"] for s in sources for r in files.read_avro(s)]
    files.rewrite_avro_without(sources, destination, {source: {"e0-0"} for source in sources}, codec)
    assert read_by_both(destination)[0] == codec and len(read_by_both(destination)[1]) == 300 * len(sources) - 1


def close(layout: Layout, reports: list, codec: str, crash_after: int | None = None) -> dict:
    """What ``CloseHour`` and ``PublishHours`` do with the hour, under a job whose codec is ``codec``."""
    plan = publish.plan_hour(layout, START, CLOSES_AT, reports, False, 0, codec=codec)
    for number, part in enumerate(publish.parts_to_write(plan)):
        if number == crash_after:
            raise OSError("the worker died")
        publish.write_part(layout, START, part)
    return publish.finish_hour(layout, START)


def test_an_update_that_changes_the_codec_leaves_every_part_of_an_hour_in_one_codec(tmp_path, registry):
    """A close that saved its plan under deflate, then crashed, is finished by the updated job under
    zstandard: its plan decides, so the hour's parts are all deflate; the next hour is zstandard."""
    layout = Layout.under(tmp_path, "service_log", WINDOW)
    reports = stage_in(layout, registry, [files.UNCOMPRESSED] * 3)
    with pytest.raises(OSError):
        close(layout, reports, "deflate", crash_after=1)

    manifest = close(layout, reports, "zstandard")
    assert [read_by_both(f["path"])[0] for f in manifest["files"]] == ["deflate"] * 3

    next_hour = Layout.under(tmp_path / "next", "service_log", WINDOW)
    manifest = close(next_hour, stage_in(next_hour, registry, [files.UNCOMPRESSED] * 2), "zstandard")
    assert [read_by_both(f["path"])[0] for f in manifest["files"]] == ["zstandard"] * 2


def test_a_plan_saved_before_plans_named_a_codec_is_published_in_deflate(tmp_path, registry):
    layout = Layout.under(tmp_path, "service_log", WINDOW)
    plan = publish.plan_hour(layout, START, CLOSES_AT, stage_in(layout, registry, ["null"]), False, 0, codec="snappy")
    [part] = publish.parts_to_write(plan)
    publish.write_part(layout, START, {k: v for k, v in part.items() if k != "codec"})
    assert read_by_both(part["path"])[0] == "deflate"


def test_a_staged_pane_moved_late_takes_the_jobs_codec(tmp_path, registry):
    layout = Layout.under(tmp_path, "service_log", WINDOW)
    [(_, _, staged)] = stage_in(layout, registry, [files.UNCOMPRESSED])
    destination = partitions.join(layout.hour(layout.late, START), "moved.avro")
    late.move_late_checked(layout, START, staged, destination, 2, "snappy")
    assert read_by_both(destination)[0] == "snappy" and not files.exists(staged)


def test_a_codec_no_reader_is_promised_is_refused(tmp_path, registry):
    settings = local_settings(tmp_path, registry["play"], local_keys(tmp_path))
    with pytest.raises(ValueError, match="codec 'lz4' is not one of deflate, snappy, zstandard"):
        dataclasses.replace(settings, codec="lz4")


def test_a_redrive_rewrites_dead_letters_and_writes_late_files_in_its_codec(tmp_path, registry):
    search = registry["search"]
    settings = local_settings(tmp_path, search, local_keys(tmp_path), codec="zstandard")
    clock = Clock(START)
    clock.arrive(message(valid_fields(search, 1), "ok", (START + 1) * 1000))
    clock.arrive(message({**valid_fields(search, 2), "new_field": "x"}, "ahead", (START + 2) * 1000))
    clock.arrive(raw_message(b"{broken", "broken"))
    clock.advance(WINDOW + LATENESS + TRIGGER)
    with streaming_pipeline() as pipeline:
        deliver(pipeline | clock.finish(), settings)

    keys = [f"--keystore=sqlite:///{tmp_path}/keystore.db", f"--local_key_file={tmp_path}/kek.key"]
    hours = [f"--window_seconds={WINDOW}", f"--allowed_lateness_seconds={LATENESS}", "--codec=zstandard"]
    replay = ["--event_type=search", f"--storage_root={tmp_path}", "--start=1970-01-01T00", "--end=1970-01-02T00"]
    assert redrive.main([*replay, "--fix=strip_unknown_fields", *keys, *hours]) == 0

    written = {root: files.glob(f"{tmp_path}/{root}/search/*/*/*.avro") for root in ("late", "dead-letter")}
    read = {root: [read_by_both(path) for path in paths] for root, paths in written.items()}
    assert {root: [[r["event_id"] for r in records] for _, records in found] for root, found in read.items()} == {
        "late": [["ahead"]],
        "dead-letter": [["broken"]],
    }
    assert {codec for found in read.values() for codec, _ in found} == {"zstandard"}
